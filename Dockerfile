# meshproxy as a sidecar container: config mounted at /etc/meshproxy (hot-reloaded), Istio's ports.
FROM python:3.11-slim
WORKDIR /opt/meshproxy
COPY pyproject.toml README.md ./
COPY meshproxy ./meshproxy
COPY config ./config
RUN pip install --no-cache-dir . && useradd --uid 1337 --no-create-home meshproxy
# UID 1337 as istio-proxy: istio-init-style iptables rules exclude this user's traffic from redirection.
USER 1337
ENV MESHPROXY_CONFIG=/etc/meshproxy \
    MESHPROXY_LISTEN=0.0.0.0:15001 \
    MESHPROXY_ADMIN=127.0.0.1:15000
EXPOSE 15001 15006
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:15000/ready')"
ENTRYPOINT ["meshproxy", "run"]
