//! When a local target's copies may be recorded before they are flushed.
//!
//! The journal must never claim more than the target's disk holds: after a
//! power loss, an index entry for a copy that was still in the page cache
//! would vouch for a file the target lost. Live mirroring flushes the
//! target (`syncfs`) before each group commit. During the initial sync,
//! where that flush was a third of the wall time, copies are recorded
//! without it, under a guard: before the first such record the journal
//! notes, durably, the current boot's id (`/proc/sys/kernel/random/boot_id`)
//! as "unflushed" for the target; a `syncfs` at the end of the initial sync
//! (or at a clean stop) clears it.
//!
//! A start that finds the note with another boot's id knows the machine
//! went down with copies unflushed: it forgets the target's index and
//! compares the whole target with the source again, as an initial sync
//! does, so every file the crash lost (on ext4, XFS and btrfs a file whose
//! data was not written back comes back shorter, or empty) is copied again.
//! The same boot's id means only the daemon died: the page cache, and so
//! every recorded copy, survived it.
//!
//! This is only sound where the target's disk goes down with the machine
//! whose boot id is noted, so only local disk filesystems qualify; a
//! network filesystem's server can restart on its own, and such targets
//! flush before every commit. A remote target's receiver reports its own
//! machine's boot id when its root qualifies (`Welcome`); the note then
//! holds that id, and the shipper's flusher compares it with the boot each
//! later flush reaches (`ship::Flusher`).

use std::os::fd::AsFd;

/// This boot's id, if the kernel provides one.
pub fn boot_id() -> Option<Vec<u8>> {
    if let Some(v) = crate::failpoints::get(crate::failpoints::Hook::BootId) {
        return (!v.is_empty()).then(|| v.into_encoded_bytes());
    }
    let s = std::fs::read("/proc/sys/kernel/random/boot_id").ok()?;
    let id = s.trim_ascii().to_vec();
    (!id.is_empty()).then_some(id)
}

/// Whether the filesystem of `fd` lives on this machine's disks (or in its
/// memory): ext2/3/4, XFS, btrfs, F2FS, bcachefs, tmpfs.
pub fn local_disk(fd: impl AsFd) -> bool {
    const LOCAL: [u64; 6] = [
        0xEF53,      // ext2/3/4
        0x5846_5342, // XFS
        0x9123_683E, // btrfs
        0xF2F5_2010, // F2FS
        0xCA45_1A4E, // bcachefs
        0x0102_1994, // tmpfs
    ];
    rustix::fs::fstatfs(fd).is_ok_and(|st| LOCAL.contains(&(st.f_type as u64)))
}
