# The reconciler container: `reconciler run` is the entrypoint (DESIGN section 6).
# Non-root (uid 10001). Pull mode reads a repository mounted read-only and owned by
# someone else (the host user): git refuses that as "dubious ownership" unless the
# directory is trusted, so the image trusts every path system-wide (a container reads
# only what was mounted into it on purpose).
FROM python:3.11.13-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY reconciler ./reconciler
COPY schemas ./schemas
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.13-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*' \
    && useradd --create-home --uid 10001 --user-group reconciler
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RECONCILER_HTTP_HOST=0.0.0.0 \
    RECONCILER_HTTP_PORT=9102
USER 10001:10001
WORKDIR /home/reconciler
EXPOSE 9102
# Liveness: /healthz (passes keep ending). Readiness for orchestrators: /readyz.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9102/healthz', timeout=2)" || exit 1
ENTRYPOINT ["reconciler"]
CMD ["run"]
