//! Validated domain types: parse, don't validate. A handler that holds a [`UserId`] or a
//! [`Title`] knows it is valid; every way in (HTTP bodies, job payloads read back from storage)
//! goes through these `parse` constructors.

use std::fmt;

use convoq_queue::Job;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a value was refused: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field's wire name (`userId`).
    pub field: &'static str,
    /// What is wrong, for a person to read.
    pub message: String,
}

impl Invalid {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        Invalid {
            field,
            message: message.into(),
        }
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// A user's id: 1 to 64 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    /// The longest accepted id, in characters.
    pub const MAX_CHARS: usize = 64;

    /// # Errors
    /// When empty, too long, or holding control characters.
    pub fn parse(field: &'static str, s: &str) -> Result<Self, Invalid> {
        let n = s.chars().count();
        if n == 0 {
            return Err(Invalid::new(field, "must not be empty"));
        }
        if n > Self::MAX_CHARS {
            return Err(Invalid::new(
                field,
                format!("must be at most {} characters (got {n})", Self::MAX_CHARS),
            ));
        }
        if has_control(s) {
            return Err(Invalid::new(field, "must not contain control characters"));
        }
        Ok(UserId(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A conversation title: trimmed, at most 200 characters, no control characters. An empty
/// title is no title.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Title(String);

impl Title {
    /// The longest accepted title, in characters.
    pub const MAX_CHARS: usize = 200;

    /// `Ok(None)` for an absent or blank title.
    ///
    /// # Errors
    /// When too long or holding control or NUL characters.
    pub fn parse(s: Option<&str>) -> Result<Option<Self>, Invalid> {
        let Some(s) = s else { return Ok(None) };
        let t = s.trim();
        if t.is_empty() {
            return Ok(None);
        }
        let n = t.chars().count();
        if n > Self::MAX_CHARS {
            return Err(Invalid::new(
                "title",
                format!("must be at most {} characters (got {n})", Self::MAX_CHARS),
            ));
        }
        if has_control(t) {
            return Err(Invalid::new(
                "title",
                "must not contain control or NUL characters",
            ));
        }
        Ok(Some(Title(t.to_owned())))
    }

    /// The title as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The personality modes a deployment offers when none are configured.
pub const DEFAULT_MODES: [&str; 5] = ["helpful", "concise", "creative", "professional", "playful"];
/// The mode a conversation gets when the request names none.
pub const DEFAULT_MODE: &str = "helpful";

/// A personality mode, one of the configured set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PersonalityMode(String);

impl PersonalityMode {
    /// The configured default when `s` is `None`.
    ///
    /// # Errors
    /// When `s` is not one of `allowed`.
    pub fn parse(s: Option<&str>, allowed: &[String]) -> Result<Self, Invalid> {
        let s = s.unwrap_or(DEFAULT_MODE);
        if allowed.iter().any(|m| m == s) {
            Ok(PersonalityMode(s.to_owned()))
        } else {
            Err(Invalid::new(
                "personalityMode",
                format!("must be one of: {}", allowed.join(", ")),
            ))
        }
    }

    /// The mode as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A Discord user id: 1 to 32 ASCII digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct DiscordId(String);

impl DiscordId {
    /// # Errors
    /// When not 1 to 32 ASCII digits.
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Invalid::new("discordId", "must be 1 to 32 digits"));
        }
        Ok(DiscordId(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A display name (`username`, `globalName`): 1 to 100 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct DisplayName(String);

impl DisplayName {
    /// # Errors
    /// When empty after trimming, longer than 100 characters, or holding control characters.
    pub fn parse(field: &'static str, s: &str) -> Result<Self, Invalid> {
        let t = s.trim();
        let n = t.chars().count();
        if n == 0 || n > 100 {
            return Err(Invalid::new(field, "must be 1 to 100 characters"));
        }
        if has_control(t) {
            return Err(Invalid::new(field, "must not contain control characters"));
        }
        Ok(DisplayName(t.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A `create_conversation` job, typed: what the HTTP API enqueues ([`ConversationJob::to_data`])
/// and what the processor and the API's idempotent replays read back from storage
/// ([`ConversationJob::from_job`]), so that both ends hold the same validated values.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationJob {
    /// Fixed at enqueue time, so that every attempt creates the same conversation; derived
    /// from the job for a Node producer's job that carries none ([`derived_conversation_id`]).
    pub conversation_id: String,
    /// The owner.
    pub user_id: UserId,
    /// The title, if any.
    pub title: Option<Title>,
    /// The personality mode.
    pub mode: PersonalityMode,
    /// The HTTP request that asked for it, for log correlation.
    pub request_id: Option<String>,
    /// Who asked (the API key's name).
    pub actor: Option<String>,
    /// A digest of the request body, for idempotent replays.
    pub body_hash: Option<String>,
}

/// A `create_conversation` payload as stored, and as a Node producer of the system being
/// replaced sends it (without `conversationId`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConversationPayload {
    #[serde(default)]
    conversation_id: Option<String>,
    user_id: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    personality_mode: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    body_hash: Option<String>,
}

impl ConversationJob {
    /// The job's payload.
    pub fn to_data(&self) -> serde_json::Value {
        let mut data = serde_json::json!({
            "conversationId": self.conversation_id,
            "userId": self.user_id,
            "title": self.title,
            "personalityMode": self.mode,
            "requestId": self.request_id,
            "actor": self.actor,
        });
        if let Some(hash) = &self.body_hash {
            data["bodyHash"] = hash.as_str().into();
        }
        data
    }

    /// Reads and validates the payload of `job` as stored, with the deployment's personality
    /// `modes`.
    ///
    /// # Errors
    /// The first field that is missing or invalid (`data` when the payload is not an object
    /// of this shape).
    pub fn from_job(job: &Job, modes: &[String]) -> Result<Self, Invalid> {
        let p: ConversationPayload = serde_json::from_value(job.data.clone())
            .map_err(|e| Invalid::new("data", e.to_string()))?;
        let conversation_id = p
            .conversation_id
            .unwrap_or_else(|| derived_conversation_id(job));
        if uuid::Uuid::parse_str(&conversation_id).is_err() {
            return Err(Invalid::new("conversationId", "must be a UUID"));
        }
        Ok(ConversationJob {
            conversation_id,
            user_id: UserId::parse("userId", &p.user_id)?,
            title: Title::parse(p.title.as_deref())?,
            mode: PersonalityMode::parse(p.personality_mode.as_deref(), modes)?,
            request_id: p.request_id,
            actor: p.actor,
            body_hash: p.body_hash,
        })
    }
}

/// The job name of conversation creation, stable across releases.
pub const CREATE_CONVERSATION: &str = "create_conversation";
/// The job name of audit recording, stable across releases.
pub const RECORD_AUDIT_EVENT: &str = "record_audit_event";
/// The queue conversation jobs go to.
pub const DATABASE_QUEUE: &str = "database";
/// The queue audit jobs go to.
pub const AUDIT_QUEUE: &str = "audit";
/// The queue reserved for message jobs.
pub const CHAT_QUEUE: &str = "chat";
/// Every queue the service owns.
pub const QUEUES: [&str; 3] = [DATABASE_QUEUE, AUDIT_QUEUE, CHAT_QUEUE];

/// The service's queue called `name`, or why there is none (naming the queues there are).
pub fn queue_named(name: &str) -> Result<&'static str, String> {
    QUEUES
        .into_iter()
        .find(|q| *q == name)
        .ok_or_else(|| format!("no queue {name:?}; queues are {}", QUEUES.join(", ")))
}

/// The payload of a `record_audit_event` job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEventJob {
    /// What happened (`conversation.created`).
    pub event: String,
    /// What it happened to.
    pub subject_id: String,
    /// Who caused it.
    pub actor: String,
    /// The request that caused it.
    #[serde(default)]
    pub request_id: Option<String>,
    /// When it happened (RFC 3339).
    pub at: String,
}

/// The conversation a `create_conversation` job creates, read without validating the rest of
/// its payload (for logs): its `conversationId`, or the one derived for a job without one.
pub fn conversation_id_of(job: &Job) -> String {
    match job.data.get("conversationId").and_then(|v| v.as_str()) {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => derived_conversation_id(job),
    }
}

/// A conversation id for a job that carries none (one added by a Node producer of the system
/// being replaced): a UUIDv7 built from the job's creation time and a digest of its queue and
/// id, so every attempt of that job derives the same conversation.
fn derived_conversation_id(job: &Job) -> String {
    let digest = Sha256::digest(format!("{}\u{0}{}", job.queue, job.id).as_bytes());
    let mut random = [0u8; 10];
    random.copy_from_slice(&digest[..10]);
    let ms = job.created_at.timestamp_millis().max(0) as u64;
    uuid::Builder::from_unix_timestamp_millis(ms, &random)
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_bounds() {
        assert!(UserId::parse("userId", "u1").is_ok());
        assert!(UserId::parse("userId", "").is_err());
        assert!(UserId::parse("userId", &"x".repeat(64)).is_ok());
        assert!(UserId::parse("userId", &"x".repeat(65)).is_err());
        assert!(UserId::parse("userId", "a\u{7}b").is_err());
    }

    #[test]
    fn title_trims_and_refuses_control_characters() {
        assert_eq!(
            Title::parse(Some("  hi  ")).unwrap().unwrap().as_str(),
            "hi"
        );
        assert_eq!(Title::parse(Some("   ")).unwrap(), None);
        assert!(Title::parse(Some(&"é".repeat(200))).unwrap().is_some());
        let e = Title::parse(Some(&"a".repeat(201))).unwrap_err();
        assert_eq!(e.field, "title");
        assert!(Title::parse(Some("a\0b")).is_err());
    }

    #[test]
    fn a_conversation_job_reads_back_as_it_was_enqueued() {
        let modes: Vec<String> = DEFAULT_MODES.iter().map(|s| s.to_string()).collect();
        let sent = ConversationJob {
            conversation_id: uuid::Uuid::now_v7().to_string(),
            user_id: UserId::parse("userId", "u1").unwrap(),
            title: Title::parse(Some(" Hi ")).unwrap(),
            mode: PersonalityMode::parse(Some("concise"), &modes).unwrap(),
            request_id: Some("r1".into()),
            actor: Some("bot".into()),
            body_hash: Some("abc".into()),
        };
        let now = chrono::Utc::now();
        let mut job = convoq_queue::Job {
            id: "j1".into(),
            queue: DATABASE_QUEUE.into(),
            name: CREATE_CONVERSATION.into(),
            data: sent.to_data(),
            opts: Default::default(),
            state: convoq_queue::JobState::Waiting,
            attempts_made: 0,
            stalled_count: 0,
            result: None,
            failed_reason: None,
            created_at: now,
            available_at: now,
            processed_at: None,
            finished_at: None,
            lease_expires_at: None,
            lease_holder: None,
        };
        assert_eq!(ConversationJob::from_job(&job, &modes).unwrap(), sent);

        // A Node producer's payload: no conversation id (one is derived, the same each time).
        job.data = serde_json::json!({ "userId": "u1", "title": null });
        let a = ConversationJob::from_job(&job, &modes).unwrap();
        assert_eq!(
            a.conversation_id,
            ConversationJob::from_job(&job, &modes)
                .unwrap()
                .conversation_id
        );
        assert_eq!(a.conversation_id, conversation_id_of(&job));
        assert_eq!(a.mode.as_str(), DEFAULT_MODE);

        for (data, field) in [
            (serde_json::json!({ "userId": "" }), "userId"),
            (
                serde_json::json!({ "userId": "u1", "conversationId": "x" }),
                "conversationId",
            ),
            (
                serde_json::json!({ "userId": "u1", "personalityMode": "grumpy" }),
                "personalityMode",
            ),
            (serde_json::json!([1]), "data"),
        ] {
            job.data = data;
            assert_eq!(
                ConversationJob::from_job(&job, &modes).unwrap_err().field,
                field
            );
        }
    }

    #[test]
    fn mode_defaults_and_must_be_configured() {
        let allowed: Vec<String> = DEFAULT_MODES.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            PersonalityMode::parse(None, &allowed).unwrap().as_str(),
            "helpful"
        );
        let e = PersonalityMode::parse(Some("grumpy"), &allowed).unwrap_err();
        assert!(e.message.contains("helpful, concise"));
    }
}
