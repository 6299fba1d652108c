//! `shardmq inspect`: what a data directory holds, read without changing anything.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;
use shardmq_shard::core::{inspect_node, ShardReport, WallClock};

/// print what a data directory holds (segments, records by type, sessions, retained and queued
/// messages, corruption found) without changing it; exit status 0 when clean, 1 when damage was found
#[derive(argh::FromArgs, Debug)]
#[argh(subcommand, name = "inspect")]
pub struct Inspect {
    /// the data directory; default ./data
    #[argh(option, default = "PathBuf::from(\"data\")")]
    data_dir: PathBuf,
    /// print JSON instead of text
    #[argh(switch)]
    json: bool,
}

/// Returns the exit status.
pub fn run(args: &Inspect, clock: WallClock) -> Result<i32> {
    let reports = match inspect_node(&args.data_dir, clock) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}: {e}", args.data_dir.display());
            return Ok(2);
        }
    };
    let clean = reports.iter().all(ShardReport::is_clean);
    if args.json {
        let shards: Vec<_> = reports.iter().map(shard_json).collect();
        let doc = json!({ "data_dir": args.data_dir, "clean": clean, "shards": shards });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_text(args, &reports, clean);
    }
    Ok(if clean { 0 } else { 1 })
}

fn problems(r: &ShardReport) -> Vec<String> {
    let mut out: Vec<String> = r
        .log
        .problems
        .iter()
        .map(|p| {
            let tag = if p.fatal { "fatal" } else { "torn tail" };
            format!("{tag}: {} offset {}: {}", p.file.display(), p.offset, p.what)
        })
        .collect();
    out.extend(r.undecodable.iter().map(|u| format!("undecodable record: {u}")));
    out
}

fn shard_json(r: &ShardReport) -> serde_json::Value {
    let segments: Vec<_> = r
        .log
        .segments
        .iter()
        .map(|s| json!({ "name": s.name, "bytes": s.file_bytes, "valid_bytes": s.valid_bytes, "records": s.records, "sealed": s.sealed }))
        .collect();
    json!({
        "shard": r.shard,
        "segments": segments,
        "records": r.log.records,
        "records_by_type": r.by_name,
        "sessions": r.sessions,
        "retained": r.retained,
        "queued_messages": r.queued_messages,
        "problems": problems(r),
        "would_open": r.log.would_open() && r.undecodable.is_empty(),
    })
}

fn print_text(args: &Inspect, reports: &[ShardReport], clean: bool) {
    println!("data directory {} ({} shards)", args.data_dir.display(), reports.len());
    for r in reports {
        println!(
            "shard {}: {} segments, {} records, {} persistent sessions, {} queued messages, {} retained",
            r.shard,
            r.log.segments.len(),
            r.log.records,
            r.sessions,
            r.queued_messages,
            r.retained
        );
        for s in &r.log.segments {
            let sealed = if s.sealed { "sealed" } else { "active" };
            println!(
                "  {}  {} bytes, {} used, {} records, {sealed}",
                s.name, s.file_bytes, s.valid_bytes, s.records
            );
        }
        if !r.by_name.is_empty() {
            let by: Vec<String> = r.by_name.iter().map(|(n, c)| format!("{n}={c}")).collect();
            println!("  records by type: {}", by.join(" "));
        }
        for p in problems(r) {
            println!("  problem: {p}");
        }
    }
    if clean {
        println!("no problems found");
    } else if reports.iter().all(|r| r.log.would_open() && r.undecodable.is_empty()) {
        println!("a torn tail was found: the broker cuts it on start and continues");
    } else {
        println!("damage found: the broker would refuse to start on this directory");
    }
}
