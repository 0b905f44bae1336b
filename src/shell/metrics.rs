//! Metrics (`/metrics`, Prometheus), liveness (`/healthz`) and readiness (`/readyz`).
