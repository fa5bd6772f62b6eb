"""Development helpers: the demo and real Mosquitto / InfluxDB / VictoriaMetrics processes on free ports."""
