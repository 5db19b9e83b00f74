//! touchctl manages marketing touchpoints (触点) as code: one TOML file per touchpoint, validated
//! against a schema generated from the Rust types, planned against the live registry and applied.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`model`] | the serde + schemars types of a touchpoint file; secret references and what they may read; the JSON Schema generated from them, its file and freshness check ([`model::schema`]); the only I/O is reading secrets and the schema file |
//! | [`load`] | reading a tree of files (again: only what changed), TOML spans, schema and cross-file checks, diagnostics; what commit the files came from and the files at another revision ([`load::git`]) |
//! | [`registry`] | the live state: the `Registry` trait, its SQLite backend, locking, generations |
//! | [`plan`] | the pure diff of desired against live, its renderings, the seal of a saved plan; gathering its inputs (secret fingerprints, the live state, a base revision) with I/O ([`plan::inputs`]) |
//! | [`apply`] | running a plan against the registry, with per-change outcomes |
//! | [`import`] | writing the TOML file of a live touchpoint |
//! | [`dispatch`] | triggers, users and recipients; the durable queue of batches and the sender |
//! | [`channel`] | the wire format of each channel: request, signing, what an answer means; the network guard |
//! | [`daemon`] | `touchctl daemon`: the HTTP API, watch and reconcile, shutdown; the open platforms' event and authorisation URLs and the bindings of Official Accounts ([`daemon::open_platform`], [`daemon::bindings`]) |
//! | [`sandbox`] | `touchctl sandbox`: stand-ins for the OA, WeCom and Getui APIs and a webhook sink, at their real paths; injected faults |
//! | [`term`] | text from files, endpoints and users escaped for a terminal (control and bidi characters) |
//! | [`store`] | owner-only SQLite files shared by the registry and the queue, created whole |
//! | [`lease`] | leases with a heartbeat: the registry lock and the daemon's hold on its queue |
//! | [`allocator`] | the binary allocator's tuning (how long freed memory is kept) |

pub mod allocator;
pub mod apply;
pub mod channel;
pub mod daemon;
pub mod dispatch;
pub mod import;
pub mod lease;
pub mod load;
pub mod model;
pub mod plan;
pub mod registry;
pub mod sandbox;
pub mod store;
pub mod term;
