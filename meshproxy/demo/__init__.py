"""Demo workloads that run behind meshproxy (Istio's Bookinfo sample)."""
