//! Storage benchmarks (a plain binary: `harness = false`; mimalloc as in the
//! server). Restarts are timed in a fresh child process, as a restart is.
//!
//! ```text
//! cargo bench -p macp-storage-fs --bench storage                 # all
//! cargo bench -p macp-storage-fs --bench storage -- append       # group commit
//! cargo bench -p macp-storage-fs --bench storage -- recovery     # 1,000,000 records, no checkpoint
//! cargo bench -p macp-storage-fs --bench storage -- restart      # 100,000 open + 1,000,000 ended sessions
//! cargo bench -p macp-storage-fs --bench storage -- maintain     # per-call cost on that directory
//! ```
//!
//! Files go under `$MACP_BENCH_DIR` (default: the system temp dir), which
//! must be a real disk for the fdatasync numbers to mean anything.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{recover_from, Gen, TempDir};
use macp_kernel::macp_wire::storage::{Record, SessionSummary};
use macp_kernel::macp_wire::Message as _;
use macp_storage::suite;
use macp_storage::{Retention, Storage};
use macp_storage_fs::{FsConfig, FsStorage};

/// The allocator the `macp-runtime` binary uses.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `sessions` sessions of `notes` Notes each (plus start and Commitment),
/// sessions interleaved in rounds as concurrent traffic would be; with the
/// summaries of the sessions that ended (after how many records).
fn traffic(sessions: usize, notes: usize, payload: usize) -> (Vec<Record>, Vec<(usize, SessionSummary)>) {
    let mut g = Gen::new(42);
    let sids: Vec<String> = (0..sessions).map(|_| g.start(86_400_000)).collect();
    for round in 0..notes {
        for sid in &sids {
            g.note(sid, if round % 2 == 0 { "I" } else { "A" }, payload);
        }
    }
    for sid in &sids {
        g.commit(sid);
    }
    (std::mem::take(&mut g.records), std::mem::take(&mut g.ended))
}

fn avg_bytes(records: &[Record]) -> usize {
    records.iter().map(|r| r.encoded_len()).sum::<usize>() / records.len().max(1)
}

/// Recoveries per measurement; the machine is shared, so min and median
/// are reported.
const RUNS: usize = 5;

fn summary_line(what: &str, times: &mut [f64]) {
    times.sort_by(f64::total_cmp);
    println!("=> {what}: min {:.3} s, median {:.3} s", times[0], times[times.len() / 2]);
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<i64> = rest.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    f.get(10).zip(f.get(11)).map_or(0.0, |(u, s)| (u + s) as f64 / 100.0)
}

/// Bytes this process read through read/pread so far (`rchar`).
fn bytes_read() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let m = e.metadata().expect("metadata");
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    total
}

struct Timed {
    secs: f64,
    cpu: f64,
    replayed: u64,
    sessions: usize,
    peak_rss_mb: u64,
    read_mb: f64,
}

/// Opens and recovers `dir` in a fresh child process, as a restart would.
fn timed_recovery(dir: &Path) -> Timed {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe).arg("child-recover").arg(dir).output().expect("spawn child");
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    Timed {
        secs: f[0].parse().expect("secs"),
        cpu: f[1].parse().expect("cpu"),
        replayed: f[2].parse().expect("replayed"),
        sessions: f[3].parse().expect("sessions"),
        peak_rss_mb: f[4].parse().expect("rss"),
        read_mb: f[5].parse().expect("read"),
    }
}

fn child_recover(dir: &str) {
    let (t, read0) = (Instant::now(), bytes_read());
    let mut st = FsStorage::open(dir, FsConfig::default()).expect("open");
    let (pipe, report) = recover_from(&mut st).expect("recover");
    let took = t.elapsed();
    assert!(report.is_clean(), "{report}");
    let read = bytes_read() - read0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    println!(
        "{} {} {} {} {} {:.1}",
        took.as_secs_f64(),
        cpu_secs(),
        report.replayed,
        pipe.kernel().session_count(),
        rss_kb / 1024,
        read as f64 / 1e6
    );
    // Exit without tearing down millions of allocations.
    std::process::exit(0);
}

/// Storage's share of a recovery: load with a visitor that keeps nothing.
fn child_load(dir: &str) {
    let (t, cpu) = (Instant::now(), cpu_secs());
    let mut st = FsStorage::open(dir, FsConfig::default()).expect("open");
    let mut n = 0u64;
    st.load(&|| false, &mut |_| {
        n += 1;
        Ok(())
    })
    .expect("load");
    println!("storage load alone: {n} events in {:.3} s ({:.2} s CPU)", t.elapsed().as_secs_f64(), cpu_secs() - cpu);
    std::process::exit(0);
}

fn append_bench() {
    println!("## append with group commit (append a batch, then one fdatasync)");
    let (records, ended) = traffic(2_000, 15, 128);
    println!("record size: {} bytes encoded (+16 frame header); {} sessions end", avg_bytes(&records), ended.len());
    // Summaries go with the batch holding their session's last record, as
    // the pipeline hands them over.
    // MACP_BENCH_NO_SUMMARIES=1 leaves them out, to compare with a build
    // whose append took records only.
    let mut ends_at: Vec<Vec<SessionSummary>> = vec![Vec::new(); records.len() + 1];
    if std::env::var_os("MACP_BENCH_NO_SUMMARIES").is_none() {
        for (at, s) in ended {
            ends_at[at].push(s);
        }
    }
    {
        // The CPU side alone (encode, checksum, open map; no write, no sync).
        let dir = TempDir::new("bench-append-cpu");
        let mut st = FsStorage::open(dir.path(), FsConfig::default()).expect("open");
        recover_from(&mut st).expect("fresh");
        let t = Instant::now();
        for (i, r) in records.iter().enumerate() {
            st.append(std::slice::from_ref(r), &ends_at[i + 1]).expect("append");
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "append without sync: {:.0} records/s ({:.2} us per record, {} records)",
            records.len() as f64 / secs,
            secs * 1e6 / records.len() as f64,
            records.len()
        );
    }
    for batch in [1usize, 16, 256] {
        let dir = TempDir::new("bench-append");
        let mut st = FsStorage::open(dir.path(), FsConfig::default()).expect("open");
        recover_from(&mut st).expect("fresh");
        let budget = Duration::from_secs(3);
        let t = Instant::now();
        let (mut n, mut syncs, mut worst) = (0usize, 0usize, Duration::ZERO);
        for (c, chunk) in records.chunks(batch).enumerate() {
            let s = Instant::now();
            let ended: Vec<SessionSummary> =
                (c * batch + 1..=c * batch + chunk.len()).flat_map(|i| ends_at[i].iter().cloned()).collect();
            st.append(chunk, &ended).expect("append");
            st.sync().expect("sync");
            worst = worst.max(s.elapsed());
            n += chunk.len();
            syncs += 1;
            if t.elapsed() > budget {
                break;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "batch {batch:>3}: {:>9.0} records/s, {:>6.0} syncs/s, {:>7.1} us/batch mean, {:>7.1} us worst ({n} records, {syncs} syncs)",
            n as f64 / secs,
            syncs as f64 / secs,
            secs * 1e6 / syncs as f64,
            worst.as_secs_f64() * 1e6,
        );
    }
}

fn write_log(dir: &Path, records: &[Record], ended: &[(usize, SessionSummary)]) {
    let mut st = FsStorage::open(dir, FsConfig::default()).expect("open");
    recover_from(&mut st).expect("fresh");
    let mut done = 0;
    let mut e = ended.iter().peekable();
    for chunk in records.chunks(4096) {
        done += chunk.len();
        let mut batch = Vec::new();
        while let Some((at, s)) = e.peek() {
            if *at > done {
                break;
            }
            batch.push(s.clone());
            e.next();
        }
        st.append(chunk, &batch).expect("append");
        st.sync().expect("sync");
        st.maintain(0).expect("maintain");
    }
}

fn recovery_bench() {
    println!("## recovery of 1,000,000 records (no checkpoint: everything replays through the kernel)");
    let t = Instant::now();
    let (records, ended) = traffic(50_000, 18, 64);
    let records = &records[..1_000_000];
    println!("generated {} records ({} bytes avg) in {:.1?}", records.len(), avg_bytes(records), t.elapsed());
    let dir = TempDir::new("bench-recovery");
    let t = Instant::now();
    write_log(dir.path(), records, &ended);
    println!("wrote the log in {:.1?}", t.elapsed());
    let mut times = Vec::new();
    for run in 1..=RUNS {
        let t = timed_recovery(dir.path());
        println!(
            "run {run}: recovered {} records, {} sessions in {:.3} s ({:.2} s CPU, peak RSS {} MB)",
            t.replayed, t.sessions, t.secs, t.cpu, t.peak_rss_mb
        );
        times.push(t.secs);
    }
    summary_line("recovery of 1,000,000 records", &mut times);
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe).arg("child-load").arg(dir.path()).output().expect("spawn child");
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

// ----- a big data directory: 100,000 open + 1,000,000 ended sessions -------

const OPEN_SESSIONS: usize = 100_000;
const ENDED_SESSIONS: u64 = 1_000_000;
/// Kernel time the synthetic ended sessions ended at (retention counts
/// from here).
const ENDED_AT: i64 = 1_600_000_000_000;

/// The synthetic ended sessions are the storage suite's, numbered far
/// above any id the kernel workload uses.
const ENDED_BASE: u64 = 1 << 40;

fn ended_record(n: u64, seq: u64) -> Record {
    suite::record(ENDED_BASE + n, seq)
}

fn ended_summary(n: u64) -> SessionSummary {
    suite::summary(ENDED_BASE + n, 2, ENDED_AT + (n as i64) / 100)
}

/// Writes the big directory: 1,000,000 ended sessions (2 records each,
/// synthetic: storage never interprets them and a restart never reads
/// them), then 100,000 open sessions from a real kernel (3 records each),
/// a checkpoint of that kernel, and a tail of 8,192 real records.
fn prepare_big(dir: &Path) {
    let t = Instant::now();
    let mut st = FsStorage::open(dir, FsConfig::default()).expect("open");
    recover_from(&mut st).expect("fresh");
    let per_batch = 2_000u64;
    for b in 0..ENDED_SESSIONS / per_batch {
        let ns = b * per_batch + 1..=(b + 1) * per_batch;
        let records: Vec<Record> = ns.clone().flat_map(|n| [ended_record(n, 1), ended_record(n, 2)]).collect();
        let ended: Vec<SessionSummary> = ns.map(ended_summary).collect();
        st.append(&records, &ended).expect("append");
        st.sync().expect("sync");
        while st.maintain(0).expect("maintain").more {}
    }
    println!("wrote {ENDED_SESSIONS} ended sessions in {:.1?}", t.elapsed());
    let t = Instant::now();
    let mut g = Gen::new(42);
    let sids: Vec<String> = (0..OPEN_SESSIONS).map(|_| g.start(86_400_000)).collect();
    for round in 0..2 {
        for sid in &sids {
            g.note(sid, if round % 2 == 0 { "I" } else { "A" }, 64);
        }
    }
    for chunk in g.records.chunks(4096) {
        st.append(chunk, &[]).expect("append");
        st.sync().expect("sync");
    }
    let snapshot = g.k.snapshot();
    st.checkpoint(&snapshot).expect("checkpoint");
    g.records.clear();
    for sid in sids.iter().take(8_192) {
        g.note(sid, "I", 64);
    }
    st.append(&g.records, &[]).expect("append");
    st.sync().expect("sync");
    drop(st);
    println!(
        "wrote {OPEN_SESSIONS} open sessions (checkpoint {} bytes of open state) + {} tail records in {:.1?}; directory {:.0} MB",
        snapshot.len(),
        g.records.len(),
        t.elapsed(),
        dir_bytes(dir) as f64 / 1e6
    );
}

fn restart_bench(dir: &Path) {
    println!("## restart with {OPEN_SESSIONS} open + {ENDED_SESSIONS} ended sessions on disk (goal <= 1 s)");
    let mut times = Vec::new();
    for run in 1..=RUNS {
        let t = timed_recovery(dir);
        println!(
            "run {run}: {} open sessions, {} tail records replayed in {:.3} s ({:.2} s CPU, peak RSS {} MB, read {:.1} MB of {:.0} MB)",
            t.sessions,
            t.replayed,
            t.secs,
            t.cpu,
            t.peak_rss_mb,
            t.read_mb,
            dir_bytes(dir) as f64 / 1e6
        );
        times.push(t.secs);
    }
    summary_line("restart", &mut times);
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn maintain_bench(dir: &Path) {
    println!("## maintain per call on the big directory");
    let cfg = FsConfig { retention: Retention::For(Duration::from_secs(60)), ..FsConfig::default() };
    let mut st = FsStorage::open(dir, cfg).expect("open");
    recover_from(&mut st).expect("recover");
    // Indexing: 512 sessions end between two calls.
    let mut index_ms = Vec::new();
    for b in 0..50u64 {
        let ns = 10_000_000 + b * 512..10_000_000 + (b + 1) * 512;
        let records: Vec<Record> = ns.clone().flat_map(|n| [ended_record(n, 1), ended_record(n, 2)]).collect();
        let ended: Vec<SessionSummary> = ns.map(ended_summary).collect();
        st.append(&records, &ended).expect("append");
        st.sync().expect("sync");
        let t = Instant::now();
        let m = st.maintain(0).expect("maintain");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if ms > 20.0 {
            println!("  slow indexing call {b}: {ms:.1} ms, {m:?}");
        }
        index_ms.push(ms);
    }
    index_ms.sort_by(f64::total_cmp);
    println!(
        "indexing 512 ended sessions per call: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} calls)",
        percentile(&index_ms, 0.5),
        percentile(&index_ms, 0.99),
        index_ms[index_ms.len() - 1],
        index_ms.len()
    );
    // Retention: everything synthetic has expired; delete and retire.
    let now = ENDED_AT + 86_400_000;
    let (mut calls, mut deleted, mut retired) = (Vec::new(), 0u64, 0u64);
    // Calls that deleted nothing made the index durable (or deleted files).
    let mut durable_ms = Vec::new();
    let t0 = Instant::now();
    while calls.len() < 700 {
        let t = Instant::now();
        let m = st.maintain(now).expect("maintain");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if ms > 20.0 {
            println!("  slow retention call {}: {ms:.1} ms, {m:?}", calls.len());
        }
        if m.expired_sessions == 0 {
            durable_ms.push(ms);
        }
        calls.push(ms);
        deleted += m.expired_sessions;
        retired += m.retired_segments;
        if !m.more {
            break;
        }
    }
    let total = t0.elapsed();
    calls.sort_by(f64::total_cmp);
    durable_ms.sort_by(f64::total_cmp);
    if !durable_ms.is_empty() {
        println!(
            "  of which {} calls made the index durable or deleted segment files: p50 {:.2} ms, max {:.2} ms",
            durable_ms.len(),
            percentile(&durable_ms, 0.5),
            durable_ms[durable_ms.len() - 1]
        );
    }
    println!(
        "retention (512 deletions per call, segment retirement): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms per call; {} calls deleted {deleted} sessions and retired {retired} segments in {:.1?}",
        percentile(&calls, 0.5),
        percentile(&calls, 0.99),
        calls[calls.len() - 1],
        calls.len(),
        total
    );
}

fn main() {
    let which: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    match which.first().map(String::as_str) {
        Some("child-recover") => return child_recover(which.get(1).expect("dir")),
        Some("child-load") => return child_load(which.get(1).expect("dir")),
        // Leaves the big directory in the given path, for profiling
        // `child-recover` by hand.
        Some("prepare-big") => return prepare_big(Path::new(which.get(1).expect("dir"))),
        _ => {}
    }
    let want = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    println!("load average at start: {}", load_average());
    if want("append") {
        append_bench();
    }
    if want("recovery") {
        recovery_bench();
    }
    if want("restart") || want("maintain") {
        let dir = TempDir::new("bench-big");
        prepare_big(dir.path());
        if want("restart") {
            restart_bench(dir.path());
        }
        if want("maintain") {
            maintain_bench(dir.path());
        }
    }
}
