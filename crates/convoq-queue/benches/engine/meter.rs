//! Per-thread CPU and context switches, from /proc/self/task.

use super::*;

/// The name of the SQLite writer's thread (`std::thread::Builder::name` in the engine's
/// `sql/writer/`), where the writer runs its task and every statement on its connection.
/// Short enough (under 16 bytes) for the kernel's `comm` to hold it whole.
pub(super) const WRITER_THREAD: &str = "convoq-writer";

#[derive(Debug, Clone, Default)]
pub(super) struct ThreadSample {
    pub(super) comm: String,
    pub(super) ticks: u64,
    pub(super) ctx_switches: u64,
}

/// Busy ticks of the whole machine (every process, the database server's included), from the
/// first line of `/proc/stat`: user, nice, system, irq and softirq.
pub(super) fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum()
}

pub(super) fn sample_threads() -> HashMap<u64, ThreadSample> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let path = entry.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        // Fields after the command: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field =
            |n: usize| -> u64 { fields.get(n - 3).and_then(|s| s.parse().ok()).unwrap_or(0) };
        let ticks = field(14) + field(15);
        let ctx_switches = std::fs::read_to_string(path.join("status"))
            .map(|s| {
                s.lines()
                    .filter(|l| {
                        l.starts_with("voluntary_ctxt_switches")
                            || l.starts_with("nonvoluntary_ctxt_switches")
                    })
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        out.insert(
            tid,
            ThreadSample {
                comm,
                ticks,
                ctx_switches,
            },
        );
    }
    out
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CpuUse {
    /// CPU of the whole process, in cores.
    pub(super) cores: f64,
    /// Busy share of the busiest SQLite writer thread ([`WRITER_THREAD`]).
    pub(super) writer_thread: f64,
    /// CPU of the tokio runtime's threads (workers and blocking threads), in cores.
    pub(super) tokio_cores: f64,
    /// Context switches of all threads.
    pub(super) ctx_switches: u64,
    /// CPU of the whole machine, in cores.
    pub(super) machine_cores: f64,
}

/// CPU use between two samples of the threads (`before`, `after`) and of the machine's busy
/// ticks (`machine`: before, after), `secs` apart.
pub(super) fn cpu_between(
    before: &HashMap<u64, ThreadSample>,
    after: &HashMap<u64, ThreadSample>,
    machine: (u64, u64),
    secs: f64,
) -> CpuUse {
    let mut total = 0u64;
    let mut tokio = 0u64;
    let mut sqlite_max = 0u64;
    let mut ctx = 0u64;
    for (tid, a) in after {
        let b = before.get(tid).filter(|b| b.comm == a.comm);
        let ticks = a.ticks - b.map_or(0, |b| b.ticks.min(a.ticks));
        ctx += a.ctx_switches - b.map_or(0, |b| b.ctx_switches.min(a.ctx_switches));
        total += ticks;
        if a.comm.starts_with("tokio-r") {
            tokio += ticks;
        }
        if a.comm == WRITER_THREAD {
            sqlite_max = sqlite_max.max(ticks);
        }
    }
    let per = |t: u64| t as f64 / TICKS_PER_SEC / secs.max(1e-9);
    CpuUse {
        cores: per(total),
        writer_thread: per(sqlite_max),
        tokio_cores: per(tokio),
        ctx_switches: ctx,
        machine_cores: per(machine.1.saturating_sub(machine.0)),
    }
}

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) scenario: String,
    pub(super) durability: Durability,
    pub(super) done: u64,
    pub(super) secs: f64,
    pub(super) ops_per_commit: f64,
    pub(super) cpu: CpuUse,
    pub(super) note: String,
}

impl Row {
    pub(super) fn per_sec(&self) -> f64 {
        self.done as f64 / self.secs.max(1e-9)
    }
}

/// The writer's and the threads' counters at the start of a timed section.
pub(super) struct Meter {
    pub(super) stats: convoq_queue::sql::WriteStats,
    pub(super) threads: HashMap<u64, ThreadSample>,
    pub(super) machine: u64,
    pub(super) t0: Instant,
}

impl Meter {
    pub(super) fn start(engine: &SqlEngine) -> Meter {
        let stats = engine.write_stats();
        let threads = sample_threads();
        Meter {
            stats,
            threads,
            machine: machine_busy_ticks(),
            t0: Instant::now(),
        }
    }

    /// Ends the timed section: `done` jobs went through.
    pub(super) fn finish(
        self,
        engine: &SqlEngine,
        scenario: String,
        durability: Durability,
        done: u64,
        note: String,
    ) -> Row {
        let secs = self.t0.elapsed().as_secs_f64();
        let threads = sample_threads();
        let machine = machine_busy_ticks();
        let stats = engine.write_stats();
        let commits = stats.commits - self.stats.commits;
        let ops = stats.operations - self.stats.operations;
        let row = Row {
            scenario,
            durability,
            done,
            secs,
            ops_per_commit: ops as f64 / commits.max(1) as f64,
            cpu: cpu_between(&self.threads, &threads, (self.machine, machine), secs),
            note,
        };
        eprintln!(
            "  {} [{}]: {} jobs in {:.2} s = {:.0} jobs/s, {:.1} ops/commit ({commits} commits), \
             {:.2} cores (tokio {:.2}), writer thread {:.0} %, {:.1} ctx sw/job",
            row.scenario,
            durability_name(durability),
            row.done,
            row.secs,
            row.per_sec(),
            row.ops_per_commit,
            row.cpu.cores,
            row.cpu.tokio_cores,
            row.cpu.writer_thread * 100.0,
            row.cpu.ctx_switches as f64 / row.done.max(1) as f64,
        );
        row
    }
}

pub(super) fn capped_note(done: u64, planned: usize, cap: Duration) -> String {
    if (done as usize) < planned {
        format!("capped at {} s: {done} of {planned}", cap.as_secs())
    } else {
        String::new()
    }
}
