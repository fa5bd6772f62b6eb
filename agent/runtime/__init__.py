"""The worker threads that move records between the stages, and what they share.

```
MQTT thread --Message--> [messages queue] --> IngestWorker: decoder -> spool entries (durable) -> ack
                                                   |                     (dead letter on bad input)
                                                   +--Window--> [windows queue] --> ScoringWorker:
                                                        BatchScorer (features -> models -> defect class)
                                                        -> AlertOutput (engine -> MQTT; state file)
MQTT thread --operator command--> [commands queue] --> ScoringWorker -> AlertOutput
spool --> writer process, at its sink's cursor (agent.storage.process, agent.storage.writer) --> sink
```
Each worker is one thread that owns the pure, non-thread-safe objects it uses (decoder, windower, alert
engine). Queues are bounded; waits and drops are counted. The workers know the stages only through their
protocols (``agent.decode.base.Decoder``, ``agent.inference.base``, ``agent.features.base``); the
composition root (``agent.bootstrap``) builds the concrete ones.
"""
