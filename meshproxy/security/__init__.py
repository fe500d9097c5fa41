"""Workload identity and transport security: the mesh CA (`ca.py`), the workload's certificates and its TLS
contexts (`certs.py`), SPIFFE ids (`spiffe.py`), what a TLS connection says about its peer (`peer.py`: principal,
SNI), upstream TLS per cluster (`client_tls.py`).
Policy evaluation (PeerAuthentication, AuthorizationPolicy, RequestAuthentication) reads what these provide.
Nothing here imports the data path (`proxy/`)."""
