//! Router tests without a socket (SPEC §3): every endpoint, every validation rule of
//! `POST /api/chat/conversations`, authentication and roles, protected mode, idempotency,
//! `Prefer: wait`, operator actions, and the metrics of SPEC §6.
//!
//! Each test opens its own SQLite file in its own temporary directory, starts the workers, and
//! drives `convoq::http::router` with `tower::ServiceExt::oneshot`. Every response passes
//! [`Harness::send`], which checks what holds for all of them: an `X-Request-Id`, never a 5xx,
//! for errors the one error shape without internals, and the OpenAPI document's word on its
//! status, body and headers (`contract.rs`).

mod harness;

mod accepted;
mod access;
mod console;
mod contract;
mod jobs;
mod ops;
mod queues;
mod users;
mod validation;
