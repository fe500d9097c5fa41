# meshproxy as a sidecar container: config mounted at /etc/meshproxy (hot-reloaded), Istio's ports.

# Build stage: the wheel, with the hot path compiled by mypyc (setup.py), which needs a C compiler.
FROM python:3.11-slim AS build
# The compiler only builds the wheel (this stage is thrown away); pinning Debian versions would break each base update.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY meshproxy ./meshproxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
# iptables: the injected istio-init container runs `meshproxy iptables` from this image (as root, NET_ADMIN).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/meshproxy
COPY --from=build /wheels /wheels
COPY config ./config
# The image must not ship an interpreted hot path by accident: the build fails if a module is not compiled.
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && python -c "from meshproxy import hot_path; s = hot_path.status(); assert not (s.interpreted or s.stale), s.describe()" \
 && useradd --uid 1337 --no-create-home meshproxy
# UID 1337 as istio-proxy: istio-init-style iptables rules exclude this user's traffic from redirection.
USER 1337
# The outbound listener trusts its client (the app beside it): loopback only, never 0.0.0.0 (an open proxy to every
# service). In a pod the sidecar runs `meshproxy run --transparent` (meshproxy inject): iptables brings the app's
# traffic to 15001/15006; only the kubelet's 15021 (/healthz/ready) and Prometheus's 15020 are for the outside.
ENV MESHPROXY_CONFIG=/etc/meshproxy \
    MESHPROXY_LISTEN=127.0.0.1:15001 \
    MESHPROXY_ADMIN=127.0.0.1:15000
EXPOSE 15020 15021
HEALTHCHECK CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:15000/ready')"]
ENTRYPOINT ["meshproxy", "run"]
