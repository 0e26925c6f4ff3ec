//! The job processors: `create_conversation` (queue `database`) and `record_audit_event`
//! (queue `audit`).
//!
//! When the queue and the store share one database (the embedded default, or one Postgres
//! database for both), `create_conversation` returns its inserts as a [`TxEffect`]: the
//! conversation, its audit record and the job's completion commit in one transaction, and no
//! audit job is needed (half the queue work per conversation). Otherwise (the queue on Redis) it
//! inserts the conversation on its own first and adds a `record_audit_event` job on `audit`,
//! which records it; the inserts are idempotent, so a retried job still has one effect. Either
//! way the audit record has the same id, `conversation.created-{conversationId}`. In the first
//! case the processor is `effect_only`: on SQLite, a job added while a local worker has a free
//! slot runs at once and is stored completed, with its conversation, in the add's own
//! transaction.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use convoq_queue::sql::{SqlConn, TxEffect};
use convoq_queue::{Completion, Job, NewJob, ProcessError, Processor};
use serde_json::json;

use crate::domain::{AuditEventJob, ConversationJob, AUDIT_QUEUE, RECORD_AUDIT_EVENT};
use crate::store::{self, NewAuditEvent, NewConversation, Store, StoreError};

/// The audit event recorded when a conversation is created.
pub const CONVERSATION_CREATED: &str = "conversation.created";

fn classify(e: StoreError) -> ProcessError {
    match e {
        StoreError::Unavailable(m) => ProcessError::retryable(format!("store unavailable: {m}")),
        StoreError::UnknownUser(u) => ProcessError::unrecoverable(format!(
            "unknown user {u:?}: create it with PUT /api/users/{{id}} first"
        )),
        other => ProcessError::unrecoverable(other),
    }
}

/// Processes `create_conversation`.
pub struct CreateConversation {
    /// The store.
    pub store: Store,
    /// Whether the queue engine commits effects in the store's database.
    pub shared_transaction: bool,
    /// The configured personality modes.
    pub modes: Vec<String>,
}

/// A row the store inserts inside the queue engine's transaction: alone, or in one statement
/// with the others of its kind in the batch.
struct StoreInsert<R>(Store, R, DateTime<Utc>);

/// The rows a [`StoreInsert`] can carry, with the store's insert of several of them.
#[async_trait]
trait InsertRows: Send + Sync + Sized + 'static {
    async fn insert(
        store: &Store,
        conn: SqlConn<'_>,
        rows: &[(&Self, DateTime<Utc>)],
    ) -> Result<(), StoreError>;
}

#[async_trait]
impl InsertRows for NewAuditEvent {
    async fn insert(
        store: &Store,
        conn: SqlConn<'_>,
        rows: &[(&Self, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        store.insert_audits_in(conn, rows).await
    }
}

/// A conversation and its audit record, inserted together.
struct ConversationAndAudit(NewConversation, NewAuditEvent);

#[async_trait]
impl InsertRows for ConversationAndAudit {
    async fn insert(
        store: &Store,
        mut conn: SqlConn<'_>,
        rows: &[(&Self, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        let conversations: Vec<_> = rows.iter().map(|(r, at)| (&r.0, *at)).collect();
        let audits: Vec<_> = rows.iter().map(|(r, at)| (&r.1, *at)).collect();
        store
            .insert_conversations_in(conn.reborrow(), &conversations)
            .await?;
        store.insert_audits_in(conn, &audits).await
    }
}

#[async_trait]
impl<R: InsertRows> TxEffect for StoreInsert<R> {
    async fn apply(&self, conn: SqlConn<'_>, _now_ms: i64) -> Result<(), ProcessError> {
        R::insert(&self.0, conn, &[(&self.1, self.2)])
            .await
            .map_err(classify)
    }
    fn group(&self) -> Option<&'static str> {
        Some(std::any::type_name::<Self>())
    }
    async fn apply_group(
        &self,
        effects: &[&dyn TxEffect],
        conn: SqlConn<'_>,
        _now_ms: i64,
    ) -> Result<(), ProcessError> {
        let rows = effects
            .iter()
            .map(|e| e.as_any().and_then(|a| a.downcast_ref::<Self>()))
            .map(|e| e.map(|e| (&e.1, e.2)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ProcessError::retryable("an effect of another kind was grouped with these")
            })?;
        R::insert(&self.0, conn, &rows).await.map_err(classify)
    }
    fn as_any(&self) -> Option<&dyn Any> {
        Some(self)
    }
}

#[async_trait]
impl Processor for CreateConversation {
    async fn process(&self, job: &Job) -> Result<Completion, ProcessError> {
        let payload = ConversationJob::from_job(job, &self.modes)
            .map_err(|e| ProcessError::unrecoverable(format!("invalid job payload: {e}")))?;
        let (conversation_id, user_id) = (&payload.conversation_id, &payload.user_id);
        // Where the insert commits in the queue's batch, an unknown user is found first (from
        // memory, for users seen before): its foreign-key failure would roll back the batch
        // shared with other jobs and have it applied again, one savepoint per effect. The
        // foreign key still guards the insert; elsewhere it is the only check, and `classify`
        // turns its failure into the job's reason.
        if self.shared_transaction
            && !self
                .store
                .user_exists(user_id.as_str())
                .await
                .map_err(classify)?
        {
            return Err(classify(StoreError::UnknownUser(user_id.to_string())));
        }
        let created_at = Utc::now();
        let conversation = NewConversation {
            id: conversation_id.clone(),
            user_id: user_id.to_string(),
            title: payload.title.as_ref().map(|t| t.as_str().to_owned()),
            personality_mode: payload.mode.as_str().to_owned(),
        };
        let actor = payload.actor.clone().unwrap_or_else(|| "unknown".into());
        // No ':' in the id: BullMQ forbids it in custom ids (it separates key parts).
        let audit_id = format!("{CONVERSATION_CREATED}-{conversation_id}");
        let mut completion = Completion::with_result(json!({
            "success": true,
            "conversationId": conversation_id,
            "createdAt": store::timestamp(created_at),
        }));
        if self.shared_transaction {
            let audit = NewAuditEvent {
                id: audit_id,
                event: CONVERSATION_CREATED.into(),
                subject_id: conversation_id.clone(),
                actor,
                request_id: payload.request_id.clone(),
            };
            completion.effect = Some(Arc::new(StoreInsert(
                self.store.clone(),
                ConversationAndAudit(conversation, audit),
                created_at,
            )));
        } else {
            self.store
                .insert_conversation(&conversation, created_at)
                .await
                .map_err(classify)?;
            let audit = AuditEventJob {
                event: CONVERSATION_CREATED.into(),
                subject_id: conversation_id.clone(),
                actor,
                request_id: payload.request_id.clone(),
                at: store::timestamp(created_at),
            };
            completion.follow_ups.push(
                NewJob::new(
                    AUDIT_QUEUE,
                    RECORD_AUDIT_EVENT,
                    serde_json::to_value(&audit).unwrap_or_default(),
                )
                .with_id(audit_id),
            );
        }
        // "conversation created" is logged once the completion has committed
        // (`telemetry::JobTelemetry`), not here: with the queue in the store's database the
        // insert commits only with the completion.
        Ok(completion)
    }

    /// Where the queue is in the store's database, the conversation and its audit record are
    /// the completion's effect and nothing else is written: the job may run as it is added,
    /// committed with its add in one transaction (`Queues::add`). Elsewhere the conversation is
    /// inserted on its own, which must not happen for a job that may never be stored.
    fn effect_only(&self) -> bool {
        self.shared_transaction
    }
}

/// Processes `record_audit_event`.
pub struct RecordAuditEvent {
    /// The store.
    pub store: Store,
    /// Whether the queue engine commits effects in the store's database.
    pub shared_transaction: bool,
}

#[async_trait]
impl Processor for RecordAuditEvent {
    async fn process(&self, job: &Job) -> Result<Completion, ProcessError> {
        let payload: AuditEventJob = serde_json::from_value(job.data.clone())
            .map_err(|e| ProcessError::unrecoverable(format!("invalid job payload: {e}")))?;
        let at = DateTime::parse_from_rfc3339(&payload.at)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| ProcessError::unrecoverable(format!("invalid job payload: at: {e}")))?;
        let event = NewAuditEvent {
            id: job.id.clone(),
            event: payload.event.clone(),
            subject_id: payload.subject_id.clone(),
            actor: payload.actor.clone(),
            request_id: payload.request_id.clone(),
        };
        let mut completion = Completion::with_result(json!({ "success": true, "auditId": job.id }));
        if self.shared_transaction {
            completion.effect = Some(Arc::new(StoreInsert(self.store.clone(), event, at)));
        } else {
            self.store
                .insert_audit(&event, at)
                .await
                .map_err(classify)?;
        }
        tracing::info!(
            request_id = payload.request_id.as_deref().unwrap_or(""),
            job_id = %job.id,
            event = %payload.event,
            conversation_id = %payload.subject_id,
            "audit event recorded"
        );
        Ok(completion)
    }
}
