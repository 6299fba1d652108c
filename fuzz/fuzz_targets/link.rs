//! Fuzzes what a cluster peer sends: link frames (`shardmq_cluster::link::decode`, and a run of them as
//! `link::frames` walks them), interest announcements (`router::Announce::decode`), interest snapshots
//! (`interest::Snapshot::decode`) and session registry messages (`link::registry::decode`). A peer that
//! lies must get an error, never a panic; a frame or message that decodes must re-encode to the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardmq_cluster::interest::Snapshot;
use shardmq_cluster::link::{self, Frame};
use shardmq_cluster::router::Announce;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((f, used))) = link::decode(data) {
        assert!(used <= data.len());
        // The handshake frames carry identities whose address re-encodes canonically: check the rest.
        if !matches!(f, Frame::Hello { .. }) {
            let mut out = Vec::new();
            link::encode(&f, &mut out);
            assert_eq!(link::decode(&out).unwrap().unwrap().0, f);
        }
    }
    for f in link::frames(data) {
        if f.is_err() {
            break;
        }
    }
    if let Ok(m) = link::registry::decode(data) {
        let mut out = Vec::new();
        link::registry::encode(&m, &mut out);
        assert_eq!(link::registry::decode(&out), Ok(m));
    }
    let _ = Announce::decode(data);
    let _ = Snapshot::decode(data);
});
