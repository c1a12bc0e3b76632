"""The feedback loop's aggregator: feedback joined to replies, metric windows in Redis, retraining triggers."""
