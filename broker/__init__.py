"""corral.broker: the durable log, the job state and the broker loop."""
