"""Sample CPU ticks of influxd, mosquitto and the agent (and its threads) every 50 ms until killed."""
import os, sys, time
out = open(sys.argv[1], "w", buffering=1)
HZ = os.sysconf("SC_CLK_TCK")
def ticks(path):
    try:
        f = open(path).read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except (OSError, IndexError):
        return None
def find():
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try: cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
        except OSError: continue
        if "influxd" in cmd and "run" in cmd: found["influxd"] = pid
        elif "mosquitto" in cmd and "-c" in cmd: found["mosquitto"] = pid
        elif "-m agent run" in cmd: found["agent"] = pid
        elif "benchmarks/run.py" in cmd: found["bench"] = pid
    return found
procs = {}
last = {}
while True:
    if len(procs) < 4: procs.update(find())
    now = time.time()
    row = [f"{now:.3f}"]
    for name, pid in sorted(procs.items()):
        t = ticks(f"/proc/{pid}/stat")
        if t is None: continue
        prev = last.get(name); last[name] = t
        if prev is not None: row.append(f"{name}={t - prev}")
    if "agent" in procs:
        try:
            for tid in os.listdir(f"/proc/{procs['agent']}/task"):
                t = ticks(f"/proc/{procs['agent']}/task/{tid}/stat")
                comm = open(f"/proc/{procs['agent']}/task/{tid}/comm").read().strip()
                key = f"t:{comm}:{tid}"; prev = last.get(key); last[key] = t
                if prev is not None and t - prev: row.append(f"{comm}={t - prev}")
        except OSError: pass
    out.write(" ".join(row) + "\n")
    time.sleep(0.05)
