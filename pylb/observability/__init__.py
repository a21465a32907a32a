"""pylb's own metrics (`pylb_*`, prometheus-client) and structured logging."""
