//! Read-only report on a data directory, for `shardmq inspect --data-dir DIR`. Uses the same scanner as
//! recovery, so it predicts exactly what [`crate::Log::open`] would do, without doing it: nothing is
//! truncated, deleted, locked or created. Files are read with `read(2)` rather than mapped, so inspecting
//! the directory of a running broker cannot fault on a file that changes underneath.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::StorageError;
use crate::format::{check_segment_header, scan, Stop, SEAL_LEN};
use crate::segment;
use crate::RecordType;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    pub name: String,
    pub id: u64,
    pub file_bytes: u64,
    /// Valid records in the segment (up to the first problem, if any).
    pub records: u64,
    /// Header plus valid records.
    pub valid_bytes: u64,
    pub sealed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectProblem {
    pub file: PathBuf,
    pub offset: u64,
    pub what: String,
    /// `Log::open` would refuse the directory because of it (otherwise it would cut a torn tail and go on).
    pub fatal: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InspectReport {
    pub dir: PathBuf,
    pub segments: Vec<SegmentReport>,
    pub by_type: BTreeMap<RecordType, u64>,
    pub records: u64,
    pub payload_bytes: u64,
    pub problems: Vec<InspectProblem>,
    /// Unfinished segment creations that `Log::open` would delete.
    pub temp_files: Vec<PathBuf>,
}

impl InspectReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Whether `Log::open` would accept the directory (possibly after cutting a torn tail).
    pub fn would_open(&self) -> bool {
        !self.problems.iter().any(|p| p.fatal)
    }
}

/// Reports on the log in `dir` without modifying anything. Damage is reported in
/// [`InspectReport::problems`], not as an error; errors are for directories and files that cannot be read.
pub fn inspect(dir: &Path) -> Result<InspectReport, StorageError> {
    inspect_records(dir, &mut |_, _| {})
}

/// [`inspect`], also handing every valid record (in log order, including any a torn tail would cut) to
/// `each`, so a caller can report on what the records mean. Read-only, like `inspect`.
pub fn inspect_records(
    dir: &Path,
    each: &mut dyn FnMut(RecordType, &[u8]),
) -> Result<InspectReport, StorageError> {
    let listing = segment::list(dir)?;
    let mut report =
        InspectReport { dir: dir.to_path_buf(), temp_files: listing.temp_files, ..InspectReport::default() };
    let mut by_type = [0u64; 256];
    let count = listing.segments.len();
    let mut prev_id = None;
    for (i, (id, path)) in listing.segments.into_iter().enumerate() {
        let last = i + 1 == count;
        let mut problem = |offset: u64, what: String, fatal: bool| {
            report.problems.push(InspectProblem { file: path.clone(), offset, what, fatal })
        };
        if let Some(p) = prev_id.filter(|&p: &u64| p + 1 != id) {
            problem(0, format!("segments {}..{} are missing before this one", p + 1, id), true);
        }
        prev_id = Some(id);
        let buf = fs::read(&path).map_err(|e| StorageError::io(&path, e))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut seg = SegmentReport {
            name,
            id,
            file_bytes: buf.len() as u64,
            records: 0,
            valid_bytes: 0,
            sealed: false,
        };
        if let Err(e) = check_segment_header(&buf, id, &path) {
            let what = match e {
                StorageError::Corrupt { reason, .. } => format!("bad segment header: {reason}"),
                other => other.to_string(),
            };
            problem(0, what, true);
            report.segments.push(seg);
            continue;
        }
        let s = scan(&buf, id, &mut |_, t, p| {
            each(RecordType(t), p);
            by_type[t as usize] += 1;
            seg.records += 1;
            report.payload_bytes += p.len() as u64;
        });
        seg.valid_bytes = s.end as u64;
        seg.sealed = s.stop == Stop::Sealed;
        match (&s.stop, last) {
            (Stop::Sealed, _) | (Stop::End { reason: None, .. }, true) => {}
            (Stop::End { reason: Some(reason), garbage_end }, true) => problem(
                s.end as u64,
                format!("torn or corrupt tail: {reason}; open would cut {} bytes here", garbage_end - s.end),
                false,
            ),
            (Stop::End { reason, .. }, false) => problem(
                s.end as u64,
                match reason {
                    Some(r) => format!("{r} (not the last segment: open would refuse)"),
                    None => "ends without a seal but a later segment exists (its tail was lost)".into(),
                },
                true,
            ),
        }
        if seg.sealed {
            seg.valid_bytes += SEAL_LEN as u64;
        }
        report.records += seg.records;
        report.segments.push(seg);
    }
    report.by_type = (0..=255u8)
        .filter(|&t| by_type[t as usize] > 0)
        .map(|t| (RecordType(t), by_type[t as usize]))
        .collect();
    Ok(report)
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "log in {}", self.dir.display())?;
        writeln!(
            f,
            "{} segments, {} records, {} payload bytes",
            self.segments.len(),
            self.records,
            self.payload_bytes
        )?;
        for s in &self.segments {
            writeln!(
                f,
                "  {}  id {}  {} bytes  {} records  {} valid bytes{}",
                s.name,
                s.id,
                s.file_bytes,
                s.records,
                s.valid_bytes,
                if s.sealed { "  sealed" } else { "" }
            )?;
        }
        if !self.by_type.is_empty() {
            writeln!(f, "records by type:")?;
            for (t, n) in &self.by_type {
                writeln!(f, "  type {t}: {n}")?;
            }
        }
        for t in &self.temp_files {
            writeln!(f, "unfinished segment creation (open would delete it): {}", t.display())?;
        }
        if self.problems.is_empty() {
            return writeln!(f, "no problems found");
        }
        writeln!(f, "problems:")?;
        for p in &self.problems {
            let tag = if p.fatal { "FATAL" } else { "torn " };
            writeln!(f, "  {tag} {} offset {}: {}", p.file.display(), p.offset, p.what)?;
        }
        if self.would_open() {
            writeln!(f, "open would cut the torn tail and start")
        } else {
            writeln!(f, "open would refuse to start on this directory")
        }
    }
}
