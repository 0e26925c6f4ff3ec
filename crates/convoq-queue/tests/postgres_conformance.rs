//! The conformance suite on the Postgres engine, when `CONVOQ_TEST_POSTGRES_URL` names a server
//! (e.g. `postgres://root@127.0.0.1:5432/postgres`); without it, each case says it is skipped.
//!
//! Every engine the suite asks for gets its own fresh database (`CREATE DATABASE cq_test_…`
//! through the URL's database as an admin connection), so that cases run in parallel; the
//! databases are dropped when the case ends (best effort).

mod pg;

convoq_queue::conformance_tests!(optional: crate::pg::factory());
