"""The replicas behind pylb: health (active probes, passive ejection) and metrics scraping."""
