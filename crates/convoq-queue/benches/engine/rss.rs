//! Scenario 5: resident memory of a worker process, measured in a child process.

use super::*;

pub(super) fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The child: opens the engine on `db`, reports memory before and after starting a holding pool,
/// then waits to be killed.
pub(super) fn rss_child(db: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (_engine, queues) = connect(format!("sqlite://{db}"), Durability::Normal).await;
        println!(
            "OPEN VmRSS={} VmHWM={}",
            status_kib("VmRSS:"),
            status_kib("VmHWM:")
        );
        let pool = queues
            .workers()
            .processor(JOB_NAME, Arc::new(Hold(Duration::from_secs(60))))
            .queue(
                QUEUE,
                WorkerOptions {
                    concurrency: RSS_CONCURRENCY,
                    batch: 64,
                    ..WorkerOptions::default()
                },
            )
            .start();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rss, hwm, in_flight) = (status_kib("VmRSS:"), status_kib("VmHWM:"), pool.in_flight());
        // One read of the whole queue (what a dashboard or the HTTP layer would do) fills a read
        // connection's page cache: reported separately.
        let counts = queues.counts(QUEUE).await.expect("counts");
        let (rss1, hwm1) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
        // Then as many at once as there are read connections, so that each fills its cache.
        let all = futures::future::join_all((0..4).map(|_| queues.counts(QUEUE))).await;
        for c in all {
            c.expect("counts");
        }
        println!(
            "POOL VmRSS={rss} VmHWM={hwm} in_flight={in_flight} waiting={} active={} \
             counted_VmRSS={rss1} counted_VmHWM={hwm1} counted4_VmRSS={} counted4_VmHWM={}",
            counts.waiting,
            counts.active,
            status_kib("VmRSS:"),
            status_kib("VmHWM:"),
        );
        // Held until the parent kills this process.
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

pub(super) fn kv(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

pub(super) struct RssReport {
    pub(super) open_rss: u64,
    pub(super) open_hwm: u64,
    pub(super) rss: u64,
    pub(super) hwm: u64,
    pub(super) in_flight: u64,
    pub(super) waiting: u64,
    pub(super) active: u64,
    pub(super) counted_rss: u64,
    pub(super) counted_hwm: u64,
    pub(super) counted4_rss: u64,
    pub(super) counted4_hwm: u64,
}

pub(super) async fn rss(args: &Args) -> RssReport {
    let (engine, queues, fresh) = open(args, Durability::Normal).await;
    let t = Instant::now();
    preload(&queues, args.rss_jobs, args.chunk).await;
    eprintln!(
        "  (pre-added {} jobs in {:.2} s)",
        args.rss_jobs,
        t.elapsed().as_secs_f64()
    );
    engine.close().await;
    let Fresh::Dir(dir) = &fresh else {
        panic!("scenario 5 runs on SQLite only");
    };
    let db = dir.path().join("queue.db");
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, &db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the RSS child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut report = RssReport {
        open_rss: 0,
        open_hwm: 0,
        rss: 0,
        hwm: 0,
        in_flight: 0,
        waiting: 0,
        active: 0,
        counted_rss: 0,
        counted_hwm: 0,
        counted4_rss: 0,
        counted4_hwm: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::task::block_in_place(|| rx.recv_timeout(left));
        let Ok(line) = line else {
            eprintln!("  RSS child did not report in time");
            break;
        };
        if line.starts_with("OPEN ") {
            report.open_rss = kv(&line, "VmRSS").unwrap_or(0);
            report.open_hwm = kv(&line, "VmHWM").unwrap_or(0);
        } else if line.starts_with("POOL ") {
            report.rss = kv(&line, "VmRSS").unwrap_or(0);
            report.hwm = kv(&line, "VmHWM").unwrap_or(0);
            report.in_flight = kv(&line, "in_flight").unwrap_or(0);
            report.waiting = kv(&line, "waiting").unwrap_or(0);
            report.active = kv(&line, "active").unwrap_or(0);
            report.counted_rss = kv(&line, "counted_VmRSS").unwrap_or(0);
            report.counted_hwm = kv(&line, "counted_VmHWM").unwrap_or(0);
            report.counted4_rss = kv(&line, "counted4_VmRSS").unwrap_or(0);
            report.counted4_hwm = kv(&line, "counted4_VmHWM").unwrap_or(0);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "  RSS: {:.1} MiB (HWM {:.1} MiB), after open {:.1} MiB, after one counts() {:.1} MiB, after 4 concurrent {:.1} MiB; \
         in flight {}, waiting {}, active {}",
        mib(report.rss),
        mib(report.hwm),
        mib(report.open_rss),
        mib(report.counted_rss),
        mib(report.counted4_rss),
        report.in_flight,
        report.waiting,
        report.active
    );
    report
}

pub(super) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
