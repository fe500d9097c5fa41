"""The sidecar in a pod: the traffic-capture rules (`iptables`) and the manifest injector (`inject`)."""
