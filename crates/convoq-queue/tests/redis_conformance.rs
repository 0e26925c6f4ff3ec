//! The conformance suite on the BullMQ engine, when `CONVOQ_TEST_REDIS_URL` names a server
//! (e.g. `redis://127.0.0.1:6379`); without it, each case says it is skipped.
//!
//! Every engine the suite asks for gets its own key prefix (`cqtest-<uuid>`), so that cases run
//! in parallel; the prefix's keys are deleted when the case ends. Where the engine differs from
//! the SQL engine (no transactional effects, leases expiring by Redis's clock), the suite says
//! so as it runs.

mod redis;

convoq_queue::conformance_tests!(optional: crate::redis::factory());
