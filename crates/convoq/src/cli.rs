//! The operator's command line: `convoq queues …` and `convoq jobs …`, run directly on the
//! configured queue engine (SQLite, Postgres or BullMQ on Redis), with no server.
//!
//! Output is a table for a person, or JSON with `--json` (the API's shapes: a job is what
//! `GET /api/jobs/{id}` shows an admin). Every failure names the problem on stderr and exits
//! with a code a script can test ([`Exit`]). Operator actions (pause, resume, retry, remove,
//! promote) are recorded in the audit log as `cli:$USER`, like the API's under the key's name.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use convoq_queue::{Job, JobState, QueueError};
use serde_json::json;

use crate::app::App;
use crate::config::{Command, JobsAction, QueuesAction};
use crate::domain::QUEUES;
use crate::http::{job_json_admin, job_json_operator, queue_state_json};

/// How an operator's command ended, as its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done (0).
    Done = 0,
    /// Failed for another reason (1): corrupt data, an internal error.
    Failed = 1,
    /// Bad usage or settings (2, as the argument parser's own).
    Usage = 2,
    /// No such job or queue (3).
    NotFound = 3,
    /// The job's state does not allow it (4).
    Refused = 4,
    /// The queue or the store cannot be reached (5).
    Unavailable = 5,
    /// `follow --timeout` passed before the job finished (6).
    TimedOut = 6,
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    /// The exit code.
    pub exit: Exit,
    /// What went wrong, naming the job, queue or setting.
    pub message: String,
}

impl CliError {
    fn new(exit: Exit, message: impl Into<String>) -> Self {
        CliError {
            exit,
            message: message.into(),
        }
    }
}

impl From<QueueError> for CliError {
    fn from(e: QueueError) -> Self {
        let exit = match &e {
            QueueError::Unavailable(_) | QueueError::Closed => Exit::Unavailable,
            QueueError::WrongState { .. } => Exit::Refused,
            QueueError::Invalid(_) => Exit::Usage,
            _ => Exit::Failed,
        };
        CliError::new(exit, e.to_string())
    }
}

/// Runs an operator's command (`queues` or `jobs`) and reports it: output on stdout, errors
/// on stderr, and the exit code.
pub async fn run(app: &App, command: Command) -> Exit {
    let actor = format!(
        "cli:{}",
        std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "unknown".to_owned())
    );
    let cli = Cli {
        app,
        actor,
        // One id per invocation, so that an audit search finds every job one command touched.
        request_id: format!("cli-{}", uuid::Uuid::now_v7()),
    };
    let outcome = match command {
        Command::Queues { action, json } => cli.queues(action, json).await,
        Command::Jobs { action, json } => cli.jobs(action, json).await,
        _ => Err(CliError::new(Exit::Usage, "not an operator command")),
    };
    match outcome {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("convoq: {}", e.message);
            e.exit
        }
    }
}

struct Cli<'a> {
    app: &'a App,
    actor: String,
    request_id: String,
}

/// Prints `text` to stdout; a closed pipe (`| head`) is not an error.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

fn known_queue(name: &str) -> Result<&'static str, CliError> {
    crate::domain::queue_named(name).map_err(|why| CliError::new(Exit::NotFound, why))
}

/// The queues a command looks in: the one named, or every queue.
fn queues_to_search(queue: Option<&str>) -> Result<Vec<&'static str>, CliError> {
    match queue {
        Some(q) => Ok(vec![known_queue(q)?]),
        None => Ok(QUEUES.to_vec()),
    }
}

impl Cli<'_> {
    async fn queues(&self, action: Option<QueuesAction>, json: bool) -> Result<Exit, CliError> {
        let queues = &self.app.queues;
        let (name, pause) = match action {
            None => return self.show_queues(json).await,
            Some(QueuesAction::Pause { name }) => (name, true),
            Some(QueuesAction::Resume { name }) => (name, false),
        };
        let name = known_queue(&name)?;
        if pause {
            queues.pause(name).await?;
        } else {
            queues.resume(name).await?;
        }
        let event = if pause {
            "queue.paused"
        } else {
            "queue.resumed"
        };
        self.app
            .store
            .record_action(&self.actor, &self.request_id, event, name)
            .await;
        if json {
            out(&format!("{}\n", json!({ "queue": name, "paused": pause })));
        } else {
            out(&format!(
                "{name}: {}\n",
                if pause { "paused" } else { "resumed" }
            ));
        }
        Ok(Exit::Done)
    }

    async fn show_queues(&self, json: bool) -> Result<Exit, CliError> {
        let mut shown = Vec::new();
        for q in QUEUES {
            let c = self.app.queues.counts(q).await?;
            let paused = self.app.queues.is_paused(q).await?;
            shown.push(queue_state_json(q, paused, &c));
        }
        if json {
            out(&format!("{}\n", json!({ "queues": shown })));
            return Ok(Exit::Done);
        }
        let header = [
            "QUEUE",
            "PAUSED",
            "WAITING",
            "ACTIVE",
            "DELAYED",
            "COMPLETED",
            "FAILED",
            "PAUSED JOBS",
            "COMPLETED (EVER)",
            "FAILED (EVER)",
        ];
        let rows: Vec<Vec<String>> = shown
            .iter()
            .map(|q| {
                let n = |path: &str| q.pointer(path).map_or(String::new(), |v| v.to_string());
                vec![
                    q["name"].as_str().unwrap_or_default().to_owned(),
                    if q["paused"] == json!(true) {
                        "yes"
                    } else {
                        "no"
                    }
                    .to_owned(),
                    n("/counts/waiting"),
                    n("/counts/active"),
                    n("/counts/delayed"),
                    n("/counts/completed"),
                    n("/counts/failed"),
                    n("/counts/paused"),
                    n("/totals/completed"),
                    n("/totals/failed"),
                ]
            })
            .collect();
        out(&table(&header, &rows));
        Ok(Exit::Done)
    }

    async fn jobs(&self, action: JobsAction, json: bool) -> Result<Exit, CliError> {
        match action {
            JobsAction::List {
                queue,
                state,
                limit,
                offset,
            } => self.list(&queue, &state, limit, offset, json).await,
            JobsAction::Show { id, queue } => self.show(&id, queue.as_deref(), json).await,
            JobsAction::Follow { id, queue, timeout } => {
                self.follow(&id, queue.as_deref(), timeout, json).await
            }
            JobsAction::Retry {
                ids,
                all_failed,
                queue,
            } => {
                if all_failed {
                    // clap requires --queue with --all-failed.
                    let queue = known_queue(queue.as_deref().unwrap_or_default())?;
                    self.retry_all_failed(queue, json).await
                } else {
                    self.act_on_each(&ids, queue.as_deref(), Action::Retry, json)
                        .await
                }
            }
            JobsAction::Remove { ids, queue } => {
                self.act_on_each(&ids, queue.as_deref(), Action::Remove, json)
                    .await
            }
            JobsAction::Promote { ids, queue } => {
                self.act_on_each(&ids, queue.as_deref(), Action::Promote, json)
                    .await
            }
        }
    }

    async fn list(
        &self,
        queue: &str,
        state: &str,
        limit: u64,
        offset: u64,
        json: bool,
    ) -> Result<Exit, CliError> {
        let queue = known_queue(queue)?;
        let state = JobState::parse(state).ok_or_else(|| {
            CliError::new(
                Exit::Usage,
                format!(
                    "--state {state:?} is not a state; states are waiting, active, delayed, \
                     completed, failed, paused"
                ),
            )
        })?;
        if !(1..=10_000).contains(&limit) {
            return Err(CliError::new(
                Exit::Usage,
                format!("--limit {limit} is out of range; it must be 1 to 10000"),
            ));
        }
        let jobs = self.app.queues.list(queue, state, offset, limit).await?;
        if json {
            let shown: Vec<_> = jobs.iter().map(job_json_operator).collect();
            out(&format!("{}\n", json!({ "jobs": shown })));
            return Ok(Exit::Done);
        }
        if jobs.is_empty() {
            out(&format!("no {state} jobs in {queue}\n"));
            return Ok(Exit::Done);
        }
        let header = [
            "ID", "NAME", "STATE", "ATTEMPTS", "CREATED", "FINISHED", "REASON",
        ];
        let rows: Vec<Vec<String>> = jobs
            .iter()
            .map(|j| {
                vec![
                    j.id.clone(),
                    j.name.clone(),
                    j.state.to_string(),
                    format!("{}/{}", j.attempts_made, j.max_attempts()),
                    crate::store::timestamp(j.created_at),
                    j.finished_at
                        .map(crate::store::timestamp)
                        .unwrap_or_default(),
                    shorten(j.failed_reason.as_deref().unwrap_or_default(), 60),
                ]
            })
            .collect();
        out(&table(&header, &rows));
        Ok(Exit::Done)
    }

    /// Finds a job by id in `queue`, or in every queue in order.
    async fn find(&self, id: &str, queue: Option<&str>) -> Result<Job, CliError> {
        if id.is_empty() || id.len() > 255 || id.chars().any(char::is_control) {
            return Err(CliError::new(
                Exit::Usage,
                format!("{id:?} is not a job id: ids are 1 to 255 characters"),
            ));
        }
        for q in queues_to_search(queue)? {
            if let Some(job) = self.app.queues.get(q, id).await? {
                return Ok(job);
            }
        }
        Err(CliError::new(
            Exit::NotFound,
            match queue {
                Some(q) => format!("no job {id} in queue {q}"),
                None => format!("no job {id} in any queue ({})", QUEUES.join(", ")),
            },
        ))
    }

    async fn show(&self, id: &str, queue: Option<&str>, json: bool) -> Result<Exit, CliError> {
        let job = self.find(id, queue).await?;
        let history = self
            .app
            .queues
            .engine()
            .history(&job.queue, &job.id)
            .await?
            .unwrap_or_default();
        let mut shown = serde_json::to_value(job_json_admin(&job)).unwrap_or_default();
        if json {
            shown["history"] = serde_json::to_value(&history).unwrap_or_default();
            out(&format!("{shown}\n"));
            return Ok(Exit::Done);
        }
        let mut text = String::new();
        if let Some(fields) = shown.as_object() {
            for (key, value) in fields {
                if matches!(key.as_str(), "data" | "opts" | "result") || value.is_null() {
                    continue;
                }
                let value = value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_owned);
                let _ = writeln!(text, "{key:<15} {value}");
            }
        }
        for key in ["result", "data", "opts"] {
            if let Some(value) = shown.get(key) {
                let pretty = serde_json::to_string_pretty(value).unwrap_or_default();
                let _ = writeln!(text, "{key}:\n{}", indent(&pretty));
            }
        }
        let _ = writeln!(text, "history:");
        let mut previous = None;
        for e in &history {
            let _ = writeln!(text, "  {}", event_line(e, previous));
            previous = Some(e.at);
        }
        out(&text);
        Ok(Exit::Done)
    }

    async fn follow(
        &self,
        id: &str,
        queue: Option<&str>,
        timeout: Option<u64>,
        json: bool,
    ) -> Result<Exit, CliError> {
        let job = self.find(id, queue).await?;
        let mut follower = self.app.queues.follow(&job.queue, &job.id);
        let deadline = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
        let mut previous = None;
        loop {
            let next = match deadline {
                None => follower.next().await?,
                Some(at) => match tokio::time::timeout_at(at, follower.next()).await {
                    Ok(next) => next?,
                    Err(_) => {
                        return Err(CliError::new(
                            Exit::TimedOut,
                            format!(
                                "job {id} did not finish within {} s",
                                timeout.unwrap_or_default()
                            ),
                        ))
                    }
                },
            };
            let Some(event) = next else {
                return Ok(Exit::Done);
            };
            if json {
                out(&format!(
                    "{}\n",
                    serde_json::to_value(&event).unwrap_or_default()
                ));
            } else {
                out(&format!("{}\n", event_line(&event, previous)));
            }
            previous = Some(event.at);
        }
    }

    /// Retries, removes or promotes each job, reporting each; every id is tried and the exit
    /// code is the first failure's.
    async fn act_on_each(
        &self,
        ids: &[String],
        queue: Option<&str>,
        action: Action,
        json: bool,
    ) -> Result<Exit, CliError> {
        let mut exit = Exit::Done;
        for id in ids {
            let outcome = match self.find(id, queue).await {
                Ok(job) => self.act(&job, action).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(state) if json => out(&format!(
                    "{}\n",
                    json!({ "id": id, "ok": true, "state": state })
                )),
                Ok(state) => out(&format!("{id}: {} ({state})\n", action.done())),
                Err(e) => {
                    if exit == Exit::Done {
                        exit = e.exit;
                    }
                    eprintln!("convoq: {id}: {}", e.message);
                    if json {
                        out(&format!(
                            "{}\n",
                            json!({ "id": id, "ok": false, "error": e.message, "exitCode": e.exit as i32 })
                        ));
                    }
                }
            }
        }
        Ok(exit)
    }

    /// Does `action` to `job`, records it, and returns the job's state after it.
    async fn act(&self, job: &Job, action: Action) -> Result<String, CliError> {
        let queues = &self.app.queues;
        let state = match action {
            Action::Retry => queues.retry(&job.queue, &job.id).await?.state.to_string(),
            Action::Promote => queues.promote(&job.queue, &job.id).await?.state.to_string(),
            Action::Remove => {
                if !queues.remove(&job.queue, &job.id).await? {
                    return Err(CliError::new(
                        Exit::NotFound,
                        format!("no job {} in queue {}", job.id, job.queue),
                    ));
                }
                "removed".to_owned()
            }
        };
        self.app
            .store
            .record_action(&self.actor, &self.request_id, action.event(), &job.id)
            .await;
        Ok(state)
    }

    /// Retries every failed job of `queue`, a page at a time; a job that another operator
    /// took first is skipped, not counted.
    async fn retry_all_failed(&self, queue: &'static str, json: bool) -> Result<Exit, CliError> {
        const PAGE: u64 = 500;
        // Jobs that fail while this runs are not chased: at most the failed jobs there were.
        let at_most = self.app.queues.counts(queue).await?.failed;
        let mut retried = 0u64;
        let mut skipped = std::collections::HashSet::new();
        loop {
            let page = self
                .app
                .queues
                .list(queue, JobState::Failed, skipped.len() as u64, PAGE)
                .await?;
            if page.is_empty() {
                break;
            }
            let mut progressed = false;
            for job in &page {
                if retried >= at_most {
                    break;
                }
                match self.act(job, Action::Retry).await {
                    Ok(_) => {
                        retried += 1;
                        progressed = true;
                    }
                    Err(e) if e.exit == Exit::Refused => {
                        skipped.insert(job.id.clone());
                    }
                    Err(e) => return Err(e),
                }
            }
            if retried >= at_most || (!progressed && page.len() < PAGE as usize) {
                break;
            }
        }
        if json {
            out(&format!(
                "{}\n",
                json!({ "queue": queue, "retried": retried, "skipped": skipped.len() })
            ));
        } else {
            out(&format!("{queue}: {retried} failed jobs retried\n"));
        }
        Ok(Exit::Done)
    }
}

#[derive(Clone, Copy)]
enum Action {
    Retry,
    Remove,
    Promote,
}

impl Action {
    fn event(self) -> &'static str {
        match self {
            Action::Retry => "job.retried",
            Action::Remove => "job.removed",
            Action::Promote => "job.promoted",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Action::Retry => "retried",
            Action::Remove => "removed",
            Action::Promote => "promoted",
        }
    }
}

/// One event as a line: when, the time since the previous one, what, the attempt, detail.
fn event_line(
    e: &convoq_queue::JobEvent,
    previous: Option<chrono::DateTime<chrono::Utc>>,
) -> String {
    let since = previous.map_or(String::new(), |p| {
        format!(
            "+{:.1} ms",
            (e.at - p).num_microseconds().unwrap_or(0) as f64 / 1000.0
        )
    });
    let detail = e.detail.as_ref().map_or(String::new(), |d| {
        shorten(
            &d.as_str().map_or_else(|| d.to_string(), str::to_owned),
            100,
        )
    });
    format!(
        "{}  {since:>11}  {:<9}  attempt {}  {detail}",
        crate::store::timestamp(e.at),
        e.kind.as_str(),
        e.attempt
    )
    .trim_end()
    .to_owned()
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `text` cut to `max` characters (with an ellipsis), on one line.
fn shorten(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A table with columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                let _ = write!(s, "{cell:<w$}  ");
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut text = line(header.to_vec());
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let t = table(
            &["ID", "STATE"],
            &[
                vec!["a-long-id".into(), "failed".into()],
                vec!["b".into(), "waiting".into()],
            ],
        );
        assert_eq!(
            t,
            "ID         STATE\na-long-id  failed\nb          waiting\n"
        );
    }

    #[test]
    fn long_reasons_are_cut_on_one_line() {
        assert_eq!(shorten("a\nb", 10), "a b");
        assert_eq!(shorten("abcdefghij", 5), "abcd…");
    }
}
