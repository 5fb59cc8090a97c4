"""Every metric the agent exports, defined in one place.

Names follow Prometheus conventions: one prefix, base units (seconds, bytes), `_total` counters.
The few metrics every cache hit updates are lock-free (agent/loop_metrics.py).
"""

from prometheus_client import Counter, Gauge, Histogram, Info

from agent.loop_metrics import LoopCounter, LoopHistogram

P = "flox_node_cache"

# Latency buckets from a sendfile'd narinfo (~100 us) to a slow upstream NAR (minutes).
LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
           60, 120, 300)
UPSTREAM_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
GIT_LATENCY = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
GC_LATENCY = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)

BUILD_INFO = Info(f"{P}_build", "Version of the running agent")

# --- serving ---------------------------------------------------------------------------------
HTTP_REQUESTS = LoopCounter(f"{P}_http_requests_total", "HTTP requests answered",
                            ["listener", "endpoint", "method", "code"])
HTTP_DURATION = LoopHistogram(f"{P}_http_request_duration_seconds",
                              "Time to answer an HTTP request (until the body is sent)",
                              ["endpoint"], buckets=LATENCY)
LOOKUPS = LoopCounter(f"{P}_lookups_total",
                      "Cache lookups by kind (narinfo, nar) and where the answer came from: local "
                      "(hit), upstream or peer (miss that fetched from there), coalesced (miss "
                      "that joined a fetch in flight), not_found, error",
                      ["kind", "source"])
SERVED_BYTES = LoopCounter(f"{P}_served_bytes_total",
                           "Bytes of NARs sent to clients, by source (local store, or streamed "
                           "from an upstream or peer fetch)", ["source"])
COALESCED_WAITERS = Gauge(f"{P}_coalesced_waiters",
                          "Clients currently waiting on a fetch another request started")
UPSTREAM_DOWNLOADS_WAITING = Gauge(f"{P}_upstream_downloads_waiting",
                                   "NAR downloads from the upstreams, and uncached "
                                   "streams, waiting for a turn (--upstream-downloads of "
                                   "each run at once)")
OPEN_CONNECTIONS = Gauge(f"{P}_open_connections", "Client connections open, by listener",
                         ["listener"])
CONNECTIONS_CLOSED = Counter(f"{P}_connections_closed_total",
                             "Client connections the agent closed to protect itself, by listener "
                             "and reason: header_timeout (request headers too slow), "
                             "idle_timeout (keep-alive), evicted (room for a new one at the cap), "
                             "refused (answered 503 at the cap, every connection busy or new)",
                             ["listener", "reason"])
STALLED_SENDS = Counter(f"{P}_stalled_sends_total",
                        "NAR transfers dropped because the client read nothing for "
                        "--client-stall-timeout seconds")
BYTES_AVOIDED = LoopCounter(f"{P}_upstream_bytes_avoided_total",
                            "Upstream bytes a client would have fetched without this cache")
SECONDS_AVOIDED = LoopCounter(f"{P}_cold_start_seconds_avoided_total",
                              "Download seconds saved for clients, estimated from the measured "
                              "upstream throughput")

# --- upstream --------------------------------------------------------------------------------
UPSTREAM_REQUESTS = Counter(f"{P}_upstream_requests_total", "Requests sent to upstream caches",
                            ["upstream", "kind", "code"])
UPSTREAM_ERRORS = Counter(f"{P}_upstream_errors_total",
                          "Upstream requests that failed (timeouts, 5xx, resets, open circuit)",
                          ["upstream", "reason"])
UPSTREAM_DURATION = Histogram(f"{P}_upstream_request_duration_seconds",
                              "Upstream request time, until the last byte",
                              ["upstream", "kind"], buckets=UPSTREAM_LATENCY)
UPSTREAM_BYTES = Counter(f"{P}_upstream_received_bytes_total",
                         "Bytes received from upstream caches", ["upstream"])
UPSTREAM_THROUGHPUT = Gauge(f"{P}_upstream_throughput_bytes_per_second",
                            "Moving average of upstream NAR download throughput", ["upstream"])
CIRCUIT_OPEN = Gauge(f"{P}_upstream_circuit_open",
                     "1 while the circuit breaker keeps an upstream out of use", ["upstream"])
VERIFY_FAILURES = Counter(f"{P}_verification_failures_total",
                          "Upstream or stored data rejected by verification", ["reason"])

# --- peers (the cluster tier) ---------------------------------------------------------------
PEER_REQUESTS = Counter(f"{P}_peer_requests_total", "Requests sent to peer agents",
                        ["peer", "kind", "code"])
PEER_ERRORS = Counter(f"{P}_peer_errors_total",
                      "Peer requests that failed (timeouts, 5xx, resets, open circuit)",
                      ["peer", "reason"])
PEER_DURATION = Histogram(f"{P}_peer_request_duration_seconds",
                          "Peer request time, until the last byte", ["peer", "kind"],
                          buckets=UPSTREAM_LATENCY)
PEER_BYTES = Counter(f"{P}_peer_received_bytes_total", "Bytes received from peer agents",
                     ["peer"])
PEER_CIRCUIT_OPEN = Gauge(f"{P}_peer_circuit_open",
                          "1 while the circuit breaker keeps a peer out of use", ["peer"])
PEER_REJECTED = Counter(f"{P}_peer_rejected_total",
                        "Narinfos and NARs from a peer refused by verification (the peer's "
                        "circuit is opened)", ["peer", "reason"])
PEERS_LIVE = Gauge(f"{P}_peers", "Live peer agents this agent may fetch from (itself excluded)")
PEER_SERVED_BYTES = Counter(f"{P}_peer_served_bytes_total",
                            "Bytes of narinfos and NARs sent to peer agents")
PEER_UNAUTHORIZED = Counter(f"{P}_peer_unauthorized_total",
                            "Requests to the peer listener refused for a missing or wrong token")

# --- store -----------------------------------------------------------------------------------
STORE_BYTES = Gauge(f"{P}_store_used_bytes", "Bytes the store counts against its budget: NAR "
                    "files, the index, temporary files, narinfos and listings")
STORE_BUDGET = Gauge(f"{P}_store_budget_bytes", "Size budget of the store")
STORE_ENTRIES = Gauge(f"{P}_store_entries", "Committed entries in the store", ["kind"])
STORE_PINNED = Gauge(f"{P}_store_pinned_bytes", "Bytes of NARs held by pins")
STORE_WRITE_ERRORS = Counter(f"{P}_store_write_errors_total",
                             "Store writes that failed (disk full, I/O error)", ["reason"])
STORE_DISK_FULL = Gauge(f"{P}_store_disk_full", "1 while the store's filesystem refuses writes")
EVICTIONS = Counter(f"{P}_evictions_total", "Entries removed to stay within the budget",
                    ["kind"])
EVICTED_BYTES = Counter(f"{P}_evicted_bytes_total", "Bytes removed to stay within the budget")
GC_DURATION = Histogram(f"{P}_gc_duration_seconds", "Duration of an eviction pass",
                        buckets=GC_LATENCY)
RECOMPRESSIONS = Counter(f"{P}_recompressions_total",
                         "NARs re-encoded to zstd for faster unpacking, by outcome", ["outcome"])
INDEX_REBUILDS = Counter(f"{P}_index_rebuilds_total",
                         "Corrupt indexes moved aside and rebuilt from the store's files")
NAR_REFETCHES = Counter(f"{P}_nar_refetches_total",
                        "NARs a client asked for that were gone from the store (evicted, lost, "
                        "or never stored on a full disk), streamed again from their source")
SCRUBBED_BYTES = Counter(f"{P}_scrubbed_bytes_total", "Bytes re-hashed by the background scrub")
DIRECT_READS = Counter(f"{P}_direct_reads_total",
                       "Committed files the node's Nix opened straight from the store directory "
                       "(a file:// substituter), not through the agent, by kind (narinfo, nar)",
                       ["kind"])
DIRECT_READ_BYTES = Counter(f"{P}_direct_read_bytes_total",
                            "Bytes of the NAR files opened straight from the store directory")
DIRECT_READS_TRACKED = Gauge(f"{P}_direct_reads_tracked",
                             "1 while the store directory is watched for direct reads (0: "
                             "inotify unavailable, such reads are neither counted nor kept)")

# --- prefetch --------------------------------------------------------------------------------
PREWARM_JOBS = Counter(f"{P}_prewarm_jobs_total", "Finished prewarm jobs by outcome",
                       ["outcome"])
PREFETCHED_PATHS = Counter(f"{P}_prefetched_paths_total", "Store paths fetched by prefetch")
PREFETCHED_BYTES = Counter(f"{P}_prefetched_bytes_total", "NAR bytes fetched by prefetch")
PREWARM_PROGRESS = Gauge(f"{P}_prewarm_progress_ratio",
                         "Share of an environment's closure bytes present on this node",
                         ["environment"])
PREWARM_REMAINING = Gauge(f"{P}_prewarm_remaining_bytes",
                          "Bytes of an environment's closure still to fetch", ["environment"])

# --- FloxHub and Kubernetes ------------------------------------------------------------------
FLOXHUB_RESOLVE = Histogram(f"{P}_floxhub_resolve_duration_seconds",
                            "Time to resolve an environment reference through FloxHub's git",
                            ["outcome"], buckets=GIT_LATENCY)
GENERATION_CHANGES = Counter(f"{P}_floxhub_generation_changes_total",
                             "New live generations noticed by the generation watch")
KUBE_WATCH_RESTARTS = Counter(f"{P}_kube_watch_restarts_total",
                              "Kubernetes watches restarted", ["resource", "reason"])
KUBE_WATCH_FAILURES = Gauge(f"{P}_kube_watch_consecutive_failures",
                            "Consecutive failed list/watch attempts of a Kubernetes watcher",
                            ["resource"])
KUBE_WATCH_LAST_SUCCESS = Gauge(f"{P}_kube_watch_last_success_timestamp_seconds",
                                "Unix time of a Kubernetes watcher's last successful list or "
                                "watch", ["resource"])

# --- the node's own Nix store (agent/node) ---------------------------------------------------
NODE_REALISATIONS = Counter(f"{P}_node_realisations_total",
                            "Top-level store paths realised and rooted in the node's Nix store")
NODE_REALISE_DURATION = Histogram(f"{P}_node_realise_duration_seconds",
                                  "Time to realise and root one top-level path through the "
                                  "node's nix-daemon", buckets=UPSTREAM_LATENCY)
NODE_REALISE_FAILURES = Counter(f"{P}_node_realise_failures_total",
                                "Failed attempts to realise into the node's Nix store, by reason",
                                ["reason"])
NODE_COPIED_PATHS = Counter(f"{P}_node_copied_paths_total",
                            "Store paths made valid in the node's store (not valid before)")
NODE_ROOTED_PATHS = Gauge(f"{P}_node_rooted_paths",
                          "Store paths of the node's store kept alive by the agent's GC roots")
NODE_ROOTED_BYTES = Gauge(f"{P}_node_rooted_bytes",
                          "NarSize of the store paths the agent's GC roots keep in the node's "
                          "store")
NODE_REALISE_BUDGET = Gauge(f"{P}_node_realise_budget_bytes",
                            "Most NarSize the agent roots in the node's store")
NODE_OVER_BUDGET = Gauge(f"{P}_node_over_budget_holders",
                         "Pin holders left without node roots by the realise budget")
NODE_REALISE_REASONS = ("socket_missing", "daemon_unreachable", "trusted_connection",
                        "not_substitutable", "refused", "substituter_error", "timeout",
                        "nix_missing", "roots_dir", "failed")


def initialise() -> None:
    """Create every known label combination at zero, so `rate()` and `increase()` see the first
    increments after a restart (a labelled series otherwise appears only at its first event)."""
    for kind in ("narinfo", "nar"):
        for source in ("local", "upstream", "peer", "coalesced", "not_found", "error"):
            LOOKUPS.labels(kind, source)
    for source in ("local", "upstream", "peer"):
        SERVED_BYTES.labels(source)
    for kind in ("narinfo", "nar"):
        DIRECT_READS.labels(kind)
    for outcome in ("succeeded", "failed"):
        PREWARM_JOBS.labels(outcome)
    for reason in ("signature", "malformed", "file_size", "file_hash", "nar_size", "nar_hash",
                   "decompress", "truncated", "compression", "scrub"):
        VERIFY_FAILURES.labels(reason)
    for reason in ("disk_full", "io_error"):
        STORE_WRITE_ERRORS.labels(reason)
    for outcome in ("ok", "rejected", "error"):
        RECOMPRESSIONS.labels(outcome)
    EVICTIONS.labels("nar")
    for reason in NODE_REALISE_REASONS:
        NODE_REALISE_FAILURES.labels(reason)
    for listener in ("unix", "tcp", "metrics"):
        OPEN_CONNECTIONS.labels(listener)
        for reason in ("header_timeout", "idle_timeout", "evicted", "refused"):
            CONNECTIONS_CLOSED.labels(listener, reason)
