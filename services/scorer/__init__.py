"""The scorer worker: arq jobs that keep every account's tier and risk current."""
