//! `shardmq-perf`: a load generator for MQTT brokers (shardmq, but any 3.1.1/5.0 broker works), built on
//! the same `shardmq-wire` codec as the broker.
//!
//! What it does:
//! - `conn`: opens thousands of idle connections at a set rate from one process with an epoll loop
//!   ([`conn`]), and reports connect rate, failures by reason and the broker's memory per connection;
//! - `fanin`, `fanout`, `pairs`, `shared`, `pub`, `sub`: message flows over blocking clients
//!   ([`engine`]), reporting throughput, end-to-end latency percentiles (send timestamp in the payload,
//!   [`payload`]) and, at QoS 1/2, every acknowledged message that never arrived; `pairs` and `fanout` run on a
//!   few epoll threads ([`pairs`]) so that scheduling hundreds of client threads does not swamp the latency;
//! - `suback`: SUBSCRIBE-to-SUBACK latency for new filters, one at a time ([`suback`]);
//! - `handshakes`: new connections per second, each a TCP connect, with `--tls-ca` a full TLS handshake,
//!   CONNECT/CONNACK and DISCONNECT ([`tls`]);
//! - `takeover`: how long a reconnecting client waits for its persistent session while its old connection
//!   is still open, on one node or across two nodes of a zone; `sessions`: many offline persistent
//!   sessions made a few at a time ([`takeover`]);
//! - every subcommand but `conn` over TLS (`--tls-ca`, and `--tls-cert`/`--tls-key` for a client
//!   certificate), every one with a user name and password (`--username`, `--password`); over TLS,
//!   `fanin`, `shared` and `pub` publish at QoS 0 only (see [`tls`]);
//! - subscribers may connect to other brokers than publishers (`--sub-port`): cluster nodes or bridged
//!   brokers, so that every message crosses between them;
//! - optionally samples the broker's CPU time and memory from /proc ([`procfs`]), and always the host's
//!   own noise: stolen CPU time and how late a sleeping thread wakes ([`host`]).
//!
//! What it does not do: WebSockets, enhanced (v5 AUTH) authentication, reconnects (but `takeover`), retained
//! messages or wills; keep-alive is always 0. It only runs on Linux (epoll, /proc, CLOCK_MONOTONIC), and
//! latency is only meaningful when publisher and subscriber share a host clock. Every run is bounded by a
//! duration and counts.

pub mod client;
pub mod conn;
pub mod engine;
pub mod guard;
pub mod host;
pub mod net;
pub mod pairs;
pub mod payload;
pub mod procfs;
pub mod stats;
pub mod suback;
pub mod takeover;
pub mod tls;
