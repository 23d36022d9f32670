//! Storage benchmarks (a plain binary: `harness = false`; mimalloc as in the server).
//!
//! ```text
//! cargo bench -p macp-storage-fs --bench storage                 # all
//! cargo bench -p macp-storage-fs --bench storage -- append       # group commit
//! cargo bench -p macp-storage-fs --bench storage -- recovery     # 1,000,000 records
//! cargo bench -p macp-storage-fs --bench storage -- restart      # 100,000 sessions
//! ```
//!
//! Files go under `$MACP_BENCH_DIR` (default: the system temp dir), which
//! must be a real disk for the fdatasync numbers to mean anything.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Gen, TempDir};
use macp_kernel::macp_wire::storage::Record;
use macp_kernel::macp_wire::Message as _;
use macp_kernel::KernelConfig;
use macp_storage_fs::{recover, FsConfig, FsStorage, Storage};

/// The allocator the `macp-runtime` binary uses.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `sessions` sessions of `notes` Notes each (plus start and Commitment),
/// sessions interleaved in rounds as concurrent traffic would be.
fn traffic(sessions: usize, notes: usize, payload: usize) -> (Gen, Vec<Record>) {
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
    let records = std::mem::take(&mut g.records);
    (g, records)
}

fn avg_bytes(records: &[Record]) -> usize {
    records.iter().map(|r| r.encoded_len()).sum::<usize>() / records.len().max(1)
}

fn write_log(dir: &std::path::Path, records: &[Record], checkpoint_at: Option<(usize, Vec<u8>)>) {
    let mut st = FsStorage::open(dir, FsConfig::default()).expect("open");
    recover(&mut st, KernelConfig::default()).expect("fresh");
    let mut done = 0;
    for chunk in records.chunks(4096) {
        st.append(chunk).expect("append");
        done += chunk.len();
        st.sync().expect("sync");
        if let Some((at, snap)) = &checkpoint_at {
            if *at == done {
                st.checkpoint(snap).expect("checkpoint");
            }
        }
    }
}

/// Recoveries per measurement; the machine is shared, so min and median
/// are reported.
const RUNS: usize = 5;

fn summary(what: &str, times: &mut [f64]) {
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

struct Timed {
    secs: f64,
    /// CPU seconds of the whole child (both threads), open to exit.
    cpu: f64,
    covered: u64,
    replayed: u64,
    sessions: usize,
    peak_rss_mb: u64,
}

/// Opens and recovers `dir` in a fresh child process, as a restart would:
/// the benchmark's own heap (after generating millions of records) would
/// otherwise slow the allocator down and distort the numbers.
fn timed_recovery(dir: &std::path::Path) -> Timed {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe).arg("child-recover").arg(dir).output().expect("spawn child");
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    Timed {
        secs: f[0].parse().expect("secs"),
        cpu: f[1].parse().expect("cpu"),
        covered: f[2].parse().expect("covered"),
        replayed: f[3].parse().expect("replayed"),
        sessions: f[4].parse().expect("sessions"),
        peak_rss_mb: f[5].parse().expect("rss"),
    }
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of those, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<i64> = rest.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    f.get(10).zip(f.get(11)).map_or(0.0, |(u, s)| (u + s) as f64 / 100.0)
}

/// How much of recovery is the kernel itself: decode everything first,
/// then time only `Kernel::apply_record` over the records.
fn child_apply(dir: &str) {
    use macp_storage_fs::LoadEvent;
    let mut st = FsStorage::open(dir, FsConfig::default()).expect("open");
    let mut records = Vec::new();
    st.load(&mut |e| {
        if let LoadEvent::Record { record, .. } = e {
            records.push(record);
        }
        Ok(())
    })
    .expect("load");
    let (t, cpu) = (Instant::now(), cpu_secs());
    let mut k = macp_kernel::Kernel::new(KernelConfig::default());
    for r in &records {
        k.apply_record(r).expect("applies");
    }
    println!(
        "kernel apply_record alone: {} records in {:.3} s wall, {:.2} s CPU",
        records.len(),
        t.elapsed().as_secs_f64(),
        cpu_secs() - cpu
    );
    std::process::exit(0);
}

fn child_recover(dir: &str) {
    let t = Instant::now();
    let mut st = FsStorage::open(dir, FsConfig::default()).expect("open");
    let rec = recover(&mut st, KernelConfig::default()).expect("recover");
    let took = t.elapsed();
    assert!(rec.report.is_clean(), "{}", rec.report);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    println!(
        "{} {} {} {} {} {}",
        took.as_secs_f64(),
        cpu_secs(),
        rec.report.covered,
        rec.report.replayed,
        rec.kernel.session_count(),
        rss_kb / 1024
    );
    // Exit without tearing down millions of allocations.
    std::process::exit(0);
}

fn append_bench() {
    println!("## append with group commit (append a batch, then one fdatasync)");
    let (_, records) = traffic(2_000, 15, 128);
    println!("record size: {} bytes encoded (+16 frame header)", avg_bytes(&records));
    {
        // The CPU side alone (encode, checksum, index; no write, no sync).
        let dir = TempDir::new("bench-append-cpu");
        let mut st = FsStorage::open(dir.path(), FsConfig::default()).expect("open");
        recover(&mut st, KernelConfig::default()).expect("fresh");
        let t = Instant::now();
        for r in &records {
            st.append(std::slice::from_ref(r)).expect("append");
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
        recover(&mut st, KernelConfig::default()).expect("fresh");
        let budget = Duration::from_secs(3);
        let t = Instant::now();
        let mut n = 0usize;
        let mut syncs = 0usize;
        let mut worst = Duration::ZERO;
        for chunk in records.chunks(batch) {
            let s = Instant::now();
            let ticket = st.append(chunk).expect("append");
            let durable = st.sync().expect("sync");
            assert!(ticket <= durable);
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

fn recovery_bench() {
    println!("## recovery of 1,000,000 records (no checkpoint: everything replays through the kernel)");
    let t = Instant::now();
    let (_, records) = traffic(50_000, 18, 64);
    assert_eq!(records.len(), 1_000_001);
    let records = &records[..1_000_000];
    println!("generated {} records ({} bytes avg) in {:.1?}", records.len(), avg_bytes(records), t.elapsed());
    let dir = TempDir::new("bench-recovery");
    let t = Instant::now();
    write_log(dir.path(), records, None);
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
    summary("recovery of 1,000,000 records", &mut times);
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe).arg("child-apply").arg(dir.path()).output().expect("spawn child");
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

/// A chunk boundary 8,192 records before the end, so a realistic tail
/// replays after the checkpoint.
fn restart_checkpoint_at(n: usize) -> usize {
    (n / 4096 - 2) * 4096
}

fn restart_bench() {
    println!("## restart with 100,000 sessions on disk");
    let (_, records) = traffic(100_000, 3, 64);
    println!("{} records ({} bytes avg)", records.len(), avg_bytes(&records));
    let (no_ck, with_ck) = (TempDir::new("bench-restart"), TempDir::new("bench-restart-ck"));
    write_log(no_ck.path(), &records, None);
    let at = restart_checkpoint_at(records.len());
    let snap = common::replay(&records[..at]).snapshot();
    println!("checkpoint after {at} records: {} bytes", snap.len());
    write_log(with_ck.path(), &records, Some((at, snap)));
    for (name, dir) in [("no checkpoint", &no_ck), ("checkpoint + tail", &with_ck)] {
        let mut times = Vec::new();
        for run in 1..=RUNS {
            let t = timed_recovery(dir.path());
            println!(
                "{name}, run {run}: {} sessions ({} covered + {} replayed records) in {:.3} s ({:.2} s CPU, peak RSS {} MB)",
                t.sessions, t.covered, t.replayed, t.secs, t.cpu, t.peak_rss_mb
            );
            times.push(t.secs);
        }
        summary(&format!("restart, {name}"), &mut times);
    }
}

fn main() {
    let which: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if which.first().map(String::as_str) == Some("prepare-recovery") {
        // Leaves a 1M-record log in the given directory, for profiling
        // `child-recover` / `child-apply` by hand.
        let (_, records) = traffic(50_000, 18, 64);
        write_log(std::path::Path::new(which.get(1).expect("dir")), &records[..1_000_000], None);
        return;
    }
    if which.first().map(String::as_str) == Some("prepare-restart") {
        // Leaves the 100k-session log with a checkpoint in the given directory.
        let (_, records) = traffic(100_000, 3, 64);
        let at = restart_checkpoint_at(records.len());
        let snap = common::replay(&records[..at]).snapshot();
        write_log(std::path::Path::new(which.get(1).expect("dir")), &records, Some((at, snap)));
        return;
    }
    if which.first().map(String::as_str) == Some("child-apply") {
        child_apply(which.get(1).expect("dir"));
        return;
    }
    if which.first().map(String::as_str) == Some("child-recover") {
        child_recover(which.get(1).expect("dir"));
        return;
    }
    let want = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    println!("load average at start: {}", load_average());
    if want("append") {
        append_bench();
    }
    if want("recovery") {
        recovery_bench();
    }
    if want("restart") {
        restart_bench();
    }
}
