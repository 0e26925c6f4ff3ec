//! convoq: a conversation service for chat products.
//!
//! # Layout
//! - [`config`]: typed, layered, validated configuration and the command line.
//! - [`domain`]: validated domain types and the job payloads and names.
//! - [`store`]: users, conversations, audit log; migrations.
//! - [`processors`]: `create_conversation` and `record_audit_event`.
//! - [`http`]: the HTTP API.
//! - [`telemetry`]: metrics and logs.
//! - [`app`]: wiring and the process roles, with graceful shutdown.
//! - [`cli`]: the operator's commands (`queues`, `jobs`) on the configured engine.

pub mod app;
pub mod cli;
pub mod config;
pub mod domain;
pub mod http;
pub mod processors;
pub mod store;
pub mod telemetry;
