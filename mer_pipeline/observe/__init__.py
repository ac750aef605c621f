"""Views of a running pipeline: span timelines, Prometheus metrics, the live terminal
view, latency plots and routing statistics of a trace."""
