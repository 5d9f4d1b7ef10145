# The listener image that compose.yaml builds: `listener migrate`, `listener run`
# and `listener sweep` all run from it. Needs DATABASE_URL (or --dsn): the
# embedded PostgreSQL is not installed here.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY listener ./listener
COPY sql ./sql
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin listener
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER listener
ENV PYTHONUNBUFFERED=1
# The metrics, /healthz and /readyz port of `listener run --metrics-port 9100`.
EXPOSE 9100
ENTRYPOINT ["listener"]
CMD ["run", "--metrics-port", "9100"]
