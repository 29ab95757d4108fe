# The reconciler container: `reconciler run` is the entrypoint (DESIGN section 6).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY reconciler ./reconciler
COPY schemas ./schemas
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 reconciler
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER reconciler
EXPOSE 9102
HEALTHCHECK --interval=15s --timeout=3s \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9102/healthz', timeout=2)" || exit 1
ENTRYPOINT ["reconciler"]
CMD ["run", "--http-port", "9102"]
