//! Remote targets: `ssh://` against a real OpenSSH server on 127.0.0.1
//! (started here on a free port, with generated host and user keys),
//! `tcp://` against `drmirror receive --listen`, outages, and the
//! receiver's handling of hostile frames.

use crate::util::*;
use std::ffi::OsString;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use drmirror::meta::{Kind, Meta};
use drmirror::protocol::{self, Chunk, Done, FrameError, Op, Reply, Request, MAGIC, VERSION};

/// An sshd of our own: loopback only, key auth only, this temp dir's keys.
pub struct Sshd {
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Sshd {
    /// `None` (with the reason printed) when the test cannot run here.
    pub fn start(root: &Path) -> Option<Sshd> {
        if !is_root() {
            eprintln!("SKIP: the sshd harness logs in as root and needs root");
            return None;
        }
        if !Path::new("/usr/sbin/sshd").exists() {
            eprintln!("SKIP: /usr/sbin/sshd missing (tools/install-deps installs openssh-server)");
            return None;
        }
        let dir = root.join("sshd");
        mkdirp(&dir);
        for k in ["host_key", "user_key"] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(k))
                .status()
                .expect("run ssh-keygen");
            assert!(st.success(), "ssh-keygen {k} failed");
        }
        std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys"))
            .expect("authorized_keys");
        // sshd's privilege separation directory.
        mkdirp(Path::new("/run/sshd"));
        let port = free_port();
        let conf = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile {d}/sshd.pid\nLogLevel ERROR\n",
            d = dir.display()
        );
        write(&dir.join("sshd_config"), conf.as_bytes());
        let mut s = Sshd {
            dir,
            port,
            child: None,
        };
        s.resume();
        Some(s)
    }

    /// (Re)starts the server on the same port and waits until it accepts.
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.dir.join("sshd.log")).expect("sshd log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(self.dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        self.child = Some(child);
        let deadline = Instant::now() + secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start listening on {}: {}",
                self.port,
                String::from_utf8_lossy(
                    &std::fs::read(self.dir.join("sshd.log")).unwrap_or_default()
                )
            );
            std::thread::sleep(ms(50));
        }
    }

    /// Stops the listener and every session it started (the receivers):
    /// the DR host is gone.
    pub fn stop(&mut self, root: &Path) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_receivers(root);
    }

    /// The `[[target]]` section for a target at `path` through this sshd.
    pub fn target_toml(&self, name: &str, path: &Path, extra: &str) -> String {
        self.target_toml_args(name, path, &["-o", "LogLevel=ERROR"], extra)
    }

    /// [`Sshd::target_toml`] with `args` in `ssh_args` (after the host-key
    /// options every connection to this sshd needs).
    pub fn target_toml_args(&self, name: &str, path: &Path, args: &[&str], extra: &str) -> String {
        let args: String = [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ]
        .iter()
        .chain(args)
        .map(|a| format!("{}, ", toml_str(Path::new(a))))
        .collect();
        format!(
            "[[target]]\nname = \"{name}\"\npath = \"ssh://root@127.0.0.1:{port}{p}\"\n\
             ssh_identity = {key}\nremote_command = {bin}\nssh_args = [{args}]\n{extra}\n",
            port = self.port,
            p = path.display(),
            key = toml_str(&self.dir.join("user_key")),
            bin = toml_str(Path::new(bin())),
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills the receivers below its path when dropped, however a test ends.
struct Reap<'p>(&'p Path);

impl Drop for Reap<'_> {
    fn drop(&mut self) {
        kill_receivers(self.0);
    }
}

/// Kills every `drmirror receive` writing below `root`.
fn kill_receivers(root: &Path) {
    let needle = root.display().to_string();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        if args.iter().any(|a| a == "receive") && args.iter().any(|a| a.starts_with(&needle)) {
            // SAFETY: plain kill(2) on a pid read from /proc.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

pub(crate) fn config(env: &Env, targets: &str, top: &str) -> String {
    format!(
        "source = {}\nstate_dir = {}\nwatch = \"auto\"\n{top}\n{targets}",
        toml_str(&env.src),
        toml_str(&env.state)
    )
}

pub(crate) fn start_config(env: &Env, toml: &str) -> Daemon {
    let d = env.spawn_config(toml);
    d.wait_log("drmirror ready", secs(60));
    d
}

#[test]
fn ssh_initial_sync_and_live_mirroring() {
    let env = Env::new();
    let Some(sshd) = Sshd::start(&env.root) else {
        return;
    };
    let n = populate_rich(&env.src);
    // A large file: streamed in chunks.
    write(&env.s("big/blob"), &pattern(5 << 20, 7));
    let d = start_config(
        &env,
        &config(&env, &sshd.target_toml("dr", &env.dst, ""), ""),
    );
    d.wait_log("initial sync complete", secs(120));
    env.converge(&["--checksum"], &d);
    assert!(n > 10);
    assert!(
        d.log().contains("connected to ssh://root@127.0.0.1"),
        "{}",
        d.log_tail()
    );

    // Live: every kind of change.
    write(&env.s("live/new"), b"new file");
    append(&env.s("big/blob"), b"tail");
    let ino_before = {
        write(&env.s("mv/a/keep"), b"k");
        env.converge(&[], &d);
        ino(&env.d("mv/a/keep"))
    };
    rename(&env.s("mv/a"), &env.s("mv/b"));
    symlink("../live/new", &env.s("mv/link"));
    chmod(&env.s("live/new"), 0o600);
    remove_dir_all(&env.s("live"));
    write(&env.s("live2/x\ny \u{7f}"), b"odd name");
    env.converge(&["--checksum"], &d);
    assert_eq!(
        ino(&env.d("mv/b/keep")),
        ino_before,
        "a directory rename must travel as a rename"
    );
    d.terminate();
}

/// On a CPU with AES instructions, drmirror asks ssh to prefer AES-GCM,
/// unless told not to or the user chose the ciphers (in `ssh_args`, or in
/// an ssh configuration file). ssh's `-v` output in drmirror's log shows
/// the cipher each connection negotiated.
#[test]
fn ssh_prefers_aes_gcm_unless_the_user_chose_the_ciphers() {
    if !drmirror::target::ssh_cipher::cpu_has_aes_gcm() {
        eprintln!(
            "SKIP: this CPU has no AES-GCM instructions, so drmirror leaves ssh's cipher alone"
        );
        return;
    }
    let env = Env::new();
    let Some(sshd) = Sshd::start(&env.root) else {
        return;
    };
    let user_config = env.root.join("ssh_config");
    write(
        &user_config,
        b"Host *\n  Ciphers aes256-ctr,aes128-gcm@openssh.com\n",
    );
    let user_config = user_config.to_string_lossy();
    // `-v`: ssh's debug lines, the negotiated cipher among them, go to
    // drmirror's log.
    let cases: [(&[&str], &str, &str); 4] = [
        (&["-v"], "", "aes128-gcm@openssh.com"),
        (
            &["-v"],
            "ssh_prefer_aes_gcm = false",
            "chacha20-poly1305@openssh.com",
        ),
        (&["-v", "-c", "aes256-ctr"], "", "aes256-ctr"),
        (&["-v", "-F", &user_config], "", "aes256-ctr"),
    ];
    for (args, extra, want) in cases {
        let toml = sshd.target_toml_args("dr", &env.dst, args, extra);
        // Each case has something to copy.
        write(&env.s("f"), want.as_bytes());
        let d = start_config(&env, &config(&env, &toml, ""));
        d.wait_log("initial sync complete", secs(120));
        env.converge(&[], &d);
        let line = d.wait_log("kex: client->server cipher:", secs(30));
        assert!(
            line.contains(&format!("cipher: {want} ")),
            "{args:?} {extra:?}: {line}"
        );
        d.terminate();
    }
}

/// `compress = true`: small files travel whole and compressed, a large one
/// in compressed chunks; the copies are exact and the wire carries less
/// than the files hold.
#[test]
fn ssh_compressed_target_mirrors_exactly_with_fewer_bytes() {
    let env = Env::new();
    let Some(sshd) = Sshd::start(&env.root) else {
        return;
    };
    let line = |i: usize| format!("{i:08} the quick brown fox jumps over the lazy dog\n");
    let mut total = 0usize;
    for i in 0..200 {
        let text: String = (0..(i % 50 + 1)).map(|j| line(i * 100 + j)).collect();
        total += text.len();
        write(&env.s(format!("t/{}/f{i}.txt", i % 7)), text.as_bytes());
    }
    // Streamed: over the whole-file limit, several 1 MiB chunks.
    let big: String = (0..60_000).map(line).collect();
    total += big.len();
    write(&env.s("big.txt"), big.as_bytes());
    // Incompressible: sent as is.
    let noise = pattern(100_000, 3);
    total += noise.len();
    write(&env.s("noise.bin"), &noise);
    let port = free_port();
    let top = format!("metrics_listen = \"127.0.0.1:{port}\"");
    let d = start_config(
        &env,
        &config(
            &env,
            &sshd.target_toml("dr", &env.dst, "compress = true"),
            &top,
        ),
    );
    d.wait_log("initial sync complete", secs(120));
    env.converge(&["--checksum"], &d);
    let text = http_get(port, "/metrics").unwrap_or_default();
    let wire = metric(&text, "drmirror_wire_bytes_total");
    assert!(
        wire > 0.0 && wire < 0.5 * total as f64,
        "wire bytes {wire} for {total} bytes of files"
    );
    // Live changes go the same ways.
    append(&env.s("big.txt"), line(1).as_bytes());
    write(&env.s("t/0/f0.txt"), b"rewritten\n");
    env.converge(&["--checksum"], &d);
    d.terminate();
}

#[test]
fn ssh_large_file_change_sends_a_delta() {
    let env = Env::new();
    let Some(sshd) = Sshd::start(&env.root) else {
        return;
    };
    let size = 32usize << 20;
    let mut data = pattern(size, 3);
    write(&env.s("vm.img"), &data);
    let port = free_port();
    let top = format!("metrics_listen = \"127.0.0.1:{port}\"");
    let d = start_config(
        &env,
        &config(&env, &sshd.target_toml("dr", &env.dst, ""), &top),
    );
    d.wait_log("initial sync complete", secs(120));
    env.converge(&["--checksum"], &d);
    let wire = || {
        let text = http_get(port, "/metrics").expect("metrics");
        metric(&text, "drmirror_wire_bytes_total")
    };
    let before = wire();
    assert!(
        before >= size as f64,
        "the first copy sends the file: {before}"
    );
    // Change 1 MiB in the middle, in place.
    for b in &mut data[(size / 2)..(size / 2 + (1 << 20))] {
        *b = b.wrapping_add(1);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(env.s("vm.img"))
        .and_then(|mut f| {
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start((size / 2) as u64))?;
            f.write_all(&data[(size / 2)..(size / 2 + (1 << 20))])
        })
        .expect("rewrite 1 MiB");
    env.converge(&["--checksum"], &d);
    let sent = wire() - before;
    eprintln!(
        "DELTA: file={} MiB changed=1 MiB sent={:.0} bytes ({:.2}% of the file)",
        size >> 20,
        sent,
        sent * 100.0 / size as f64
    );
    assert!(
        sent < (size / 10) as f64,
        "a 1 MiB change to a {} MiB file sent {sent} bytes: no delta",
        size >> 20
    );
    d.terminate();
}

#[test]
fn tcp_target_needs_the_token() {
    let env = Env::new();
    write(&env.s("a/f"), b"over tcp");
    let token = env.root.join("token");
    write(&token, b"right-token\n");
    let wrong = env.root.join("wrong");
    write(&wrong, b"wrong-token\n");
    let port = free_port();
    let recv = Daemon::spawn(
        &[
            OsString::from("receive"),
            OsString::from("--listen"),
            OsString::from(format!("127.0.0.1:{port}")),
            OsString::from("--root"),
            env.dst.clone().into_os_string(),
            OsString::from("--token-file"),
            token.clone().into_os_string(),
        ],
        &env.root,
        None,
        None,
    );
    recv.wait_log("listening on", secs(20));
    let target = |tok: &Path| {
        format!(
            "[[target]]\nname = \"dr\"\npath = \"tcp://127.0.0.1:{port}{}\"\ntoken_file = {}\n",
            env.dst.display(),
            toml_str(tok)
        )
    };
    let d = start_config(&env, &config(&env, &target(&wrong), ""));
    d.wait_log("authentication failed", secs(30));
    assert!(!exists(&env.d("a/f")));
    d.terminate();
    let d = start_config(&env, &config(&env, &target(&token), ""));
    env.converge(&["--checksum"], &d);
    d.terminate();
    recv.terminate();
}

/// New small files in a directory the target lacked are created at their
/// names (one `openat` with `O_EXCL`; no temp inode, no link), and only the
/// first of them is `fstat`ed (the others of its mode come out the same);
/// with `atomic_new_files = true` each goes through a temp inode and a link.
/// The receiver runs under strace, which counts those system calls.
#[test]
fn new_files_in_new_directories_are_created_at_their_names_unless_atomic_is_asked() {
    if !Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIP: strace is not installed (tools/install-deps installs it)");
        return;
    }
    const N: usize = 40;
    for atomic in [false, true] {
        let env = Env::new();
        for i in 0..N {
            write(
                &env.s(format!("new/dir/f{i:03}")),
                format!("file {i}").as_bytes(),
            );
        }
        let tcp = Tcp::new(&env);
        let trace = env.root.join("strace.log");
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-qq", "-e", "trace=openat,linkat,fstat", "-o"])
            .arg(&trace)
            .arg(bin());
        let recv = tcp.receiver_on(&env, cmd, "127.0.0.1", &[], &[]);
        // Killing strace (as a failed test's cleanup does) leaves the
        // receiver under it running.
        let _reap = Reap(&env.dst);
        let extra = if atomic {
            "atomic_new_files = true\n"
        } else {
            ""
        };
        let targets = format!("{}{extra}", tcp.target_toml(&env));
        let d = start_config(&env, &config(&env, &targets, ""));
        d.wait_log("initial sync complete", secs(120));
        env.converge(&["--checksum"], &d);
        d.terminate();
        // strace outlives a SIGTERM of its own; the receiver under it
        // stops on one, and strace then exits with its log complete.
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", recv.pid))
            .expect("strace's children");
        for pid in children.split_whitespace() {
            let pid: i32 = pid.parse().expect("pid");
            // SAFETY: plain kill(2) on a pid read from /proc.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        recv.wait_exit(secs(30));
        let log = std::fs::read_to_string(&trace).expect("strace log");
        let created = log
            .lines()
            .filter(|l| l.contains("openat(") && l.contains("\"f0") && l.contains("O_EXCL"))
            .count();
        let linked = log
            .lines()
            .filter(|l| l.contains("linkat(") && l.contains("\"f0") && l.contains("AT_EMPTY_PATH"))
            .count();
        let want = if atomic { (0, N) } else { (N, 0) };
        assert_eq!(
            (created, linked),
            want,
            "atomic_new_files = {atomic}: (created at the name, linked from a temp inode)"
        );
        // The receiver's fstat of a regular file: once per file through
        // a temp inode (which shows that this counts them), and only the
        // first of those created at their names.
        let stats = log
            .lines()
            .filter(|l| l.contains(" fstat(") && l.contains("S_IFREG"))
            .count();
        if atomic {
            assert!(
                stats >= N,
                "{stats} fstat calls for {N} new files through temp inodes"
            );
        } else {
            assert!(
                stats < N / 4,
                "{stats} fstat calls for {N} new files created at their names"
            );
        }
    }
}

/// New files created at their names in one new directory, with several
/// modes (set-user-ID among them) and owners, in a set-group-ID directory
/// whose group they inherit on creation: each ends with its own mode and
/// owner, although only the first of each mode was `fstat`ed (see `Born`).
#[test]
fn new_files_of_mixed_modes_and_owners_in_one_directory_keep_their_own() {
    if !is_root() {
        eprintln!("SKIP: keeping owners needs root");
        return;
    }
    let env = Env::new();
    let modes = [
        0o644, 0o600, 0o644, 0o755, 0o4755, 0o640, 0o644, 0o2755, 0o600,
    ];
    let owners = [(0, 0), (1234, 5678), (0, 5678), (1234, 0)];
    for (i, mode) in modes.iter().cycle().take(36).enumerate() {
        let p = env.s(format!("new/sg/f{i:02}"));
        write(&p, format!("file {i}").as_bytes());
        let (u, g) = owners[i % owners.len()];
        lchown(&p, u, g);
        chmod(&p, *mode);
    }
    lchown(&env.s("new/sg"), 0, 5678);
    chmod(&env.s("new/sg"), 0o2775);
    let tcp = Tcp::new(&env);
    let recv = tcp.receiver(&env, &[]);
    let d = start_config(&env, &config(&env, &tcp.target_toml(&env), ""));
    d.wait_log("initial sync complete", secs(120));
    env.converge(&["--checksum"], &d);
    for (i, mode) in modes.iter().cycle().take(36).enumerate() {
        let m = std::fs::symlink_metadata(env.d(format!("new/sg/f{i:02}"))).expect("copy");
        let (u, g) = owners[i % owners.len()];
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid()),
            (*mode, u, g),
            "f{i:02}: (mode, uid, gid)"
        );
    }
    d.terminate();
    recv.terminate();
}

/// A file that grows, shrinks and is overwritten in place while it is
/// sent (the sender reads up to the size it saw at open) ends equal on the
/// target once the writes stop. (A torn copy is also followed by the event
/// of the write that tore it, so this shows convergence; it cannot tell
/// whether the stat after each copy abandoned the torn ones.)
#[test]
fn a_file_changing_while_it_is_sent_arrives_whole() {
    const SIZE: usize = 2 << 20;
    let env = Env::new();
    write(&env.s("hot"), &pattern(SIZE, 0));
    write(&env.s("calm"), b"calm");
    let tcp = Tcp::new(&env);
    let recv = tcp.receiver(&env, &[]);
    let d = start_config(&env, &config(&env, &tcp.target_toml(&env), ""));
    env.converge(&[], &d);
    let path = env.s("hot");
    let start = Instant::now();
    let mut i: u64 = 1;
    while start.elapsed() < secs(3) {
        match i % 3 {
            // Grows.
            0 => append(&path, &pattern(100_000, i)),
            // Truncating rewrite with another size.
            1 => write(&path, &pattern(SIZE + (i as usize % 7) * 1000, i)),
            // In place, size unchanged.
            _ => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open hot");
                f.write_all(&pattern(65_536, i)).expect("overwrite hot");
            }
        }
        i += 1;
    }
    assert!(i > 10, "the writer made only {i} changes");
    env.converge_for(&["--checksum"], &d, secs(120));
    d.terminate();
    recv.terminate();
}

/// During the initial sync a receiver on a local disk lets the daemon
/// record copies before they are flushed, under the receiving machine's
/// boot id (`Welcome`). The index may then vouch for a copy the DR disk
/// lost if that machine goes down: a later connection that reports another
/// boot must have the whole target compared again, and one that reports
/// the same boot (only a process died) must not.
#[test]
fn copies_recorded_unflushed_are_compared_again_after_the_receivers_machine_restarts() {
    let test_boot_id = drmirror::failpoints::Hook::BootId.var();
    let env = Env::new();
    let files = gen_tree(&env.s("t"), 400, 50);
    let tcp = Tcp::new(&env);
    let receiver = |boot: &str| tcp.receiver(&env, &[(test_boot_id, boot)]);
    let toml = config(&env, &tcp.target_toml(&env), "");
    let recv = receiver("boot-a");
    let d = start_config(&env, &toml);
    d.wait_log("initial sync complete", secs(120));
    // Only copies recorded unflushed are flushed under this line.
    eprintln!("{}", d.wait_log("target flushed", secs(60)));
    d.terminate();
    let journal_path = env.state.join("journal");
    {
        let j = drmirror::journal::Journal::open(&journal_path).expect("journal");
        assert_eq!(
            j.unflushed(0).expect("note"),
            None,
            "a clean stop leaves nothing unflushed"
        );
    }
    let victim = env.d(files[123].strip_prefix(&env.src).expect("under src"));
    // As the DR machine's power loss would leave it.
    let lose_copy = || lose_unflushed_copy(&journal_path, &victim, b"boot-a");

    lose_copy();
    let d = start_config(&env, &toml);
    d.wait_log("startup scan done", secs(60));
    d.wait_log("target flushed", secs(60));
    let (same, report) = env.verify(&[]);
    assert!(
        !same && report.contains(&*victim.file_name().expect("name").to_string_lossy()),
        "in the same boot of the receiver's machine the index vouches for the copy, which stays damaged: {report}"
    );
    assert!(
        !d.log().contains("comparing the whole target"),
        "{}",
        d.log_tail()
    );
    d.terminate();

    lose_copy();
    recv.terminate();
    let recv = receiver("boot-b");
    let d = start_config(&env, &toml);
    d.wait_log("comparing the whole target with the source again", secs(60));
    env.converge(&["--checksum"], &d);
    d.terminate();
    recv.terminate();
    let j = drmirror::journal::Journal::open(&journal_path).expect("journal");
    assert_eq!(
        j.unflushed(0).expect("note"),
        None,
        "a clean stop leaves nothing unflushed"
    );
    drop(j);

    // The DR machine is still down when the daemon starts, and comes back
    // with another boot while nothing changes on the source.
    lose_copy();
    let d = start_config(&env, &toml);
    d.wait_log("startup scan done", secs(60));
    let recv = receiver("boot-c");
    d.wait_log("comparing the whole target with the source again", secs(90));
    env.converge(&["--checksum"], &d);
    d.terminate();
    recv.terminate();

    // A receiver that reports no boot id (its root moved to a network
    // filesystem, say) cannot vouch for the copies of an earlier boot.
    lose_copy();
    let recv = receiver("");
    let d = start_config(&env, &toml);
    d.wait_log("comparing the whole target with the source again", secs(60));
    env.converge(&["--checksum"], &d);
    d.terminate();
    recv.terminate();
}

/// A connection that finds another boot of the receiver's machine than the
/// connection before it moves the target's boot epoch; the shipper then
/// holds copies made across the move as `ApplyBoot::Mixed`, which no flush
/// covers (see `ship::tests`). A reconnect to the same boot (only the
/// receiver process restarted) leaves the epoch where it was.
#[test]
fn the_boot_epoch_moves_only_when_the_receivers_machine_restarted() {
    let test_boot_id = drmirror::failpoints::Hook::BootId.var();
    use drmirror::target::remote::{RemoteSpec, RemoteTarget, Transport};
    let env = Env::new();
    let tcp = Tcp::new(&env);
    let spec = RemoteSpec {
        transport: Transport::Tcp {
            host: "127.0.0.1".into(),
            port: tcp.port,
        },
        path: env.dst.clone(),
        identity: None,
        ssh_args: Vec::new(),
        prefer_aes_gcm: true,
        command: "drmirror".into(),
        token: Some("tcp-test-token".into()),
        compress: false,
        bwlimit: 0,
        atomic_new_files: false,
    };
    let r = RemoteTarget::new("dr", spec, false);
    // A flush, retried while the receiver is starting and through the
    // reconnect backoff; returns the boot the receiver reported.
    let flush = |r: &RemoteTarget| -> Option<Vec<u8>> {
        let t0 = Instant::now();
        loop {
            match r.sync() {
                Ok(boot) => return boot,
                Err(e) if t0.elapsed() < secs(60) => {
                    eprintln!("flush: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(e) => panic!("no flush within 60 s: {e}"),
            }
        }
    };
    let recv = tcp.receiver(&env, &[(test_boot_id, "boot-a")]);
    assert_eq!(flush(&r).as_deref(), Some(b"boot-a".as_slice()));
    let (gen, boot) = r.boot_epoch();
    assert_eq!(boot.as_deref(), Some(b"boot-a".as_slice()));
    recv.terminate();

    let recv = tcp.receiver(&env, &[(test_boot_id, "boot-a")]);
    assert_eq!(flush(&r).as_deref(), Some(b"boot-a".as_slice()));
    assert_eq!(r.boot_epoch().0, gen, "the same boot, reconnected");
    recv.terminate();

    let recv = tcp.receiver(&env, &[(test_boot_id, "boot-b")]);
    assert_eq!(flush(&r).as_deref(), Some(b"boot-b".as_slice()));
    assert_eq!(
        r.boot_epoch(),
        (gen + 1, Some(b"boot-b".to_vec())),
        "another boot"
    );
    recv.terminate();
}

/// The flush that ends an initial sync can find the DR machine gone (here
/// its receiver exits when asked to flush). The copies stay recorded
/// unflushed under that machine's boot. Once it is back the daemon flushes
/// on its own, though nothing changes on the source: in the same boot it
/// clears the note; after a restart of that machine, which took a copy's
/// data with it, it compares the whole target again and repairs it.
#[test]
fn a_flush_that_found_the_target_down_is_retried_with_nothing_to_ship() {
    let test_boot_id = drmirror::failpoints::Hook::BootId.var();
    for restarted in [false, true] {
        let env = Env::new();
        let files = gen_tree(&env.s("t"), 300, 50);
        let tcp = Tcp::new(&env);
        let toml = config(&env, &tcp.target_toml(&env), "");
        let recv = tcp.receiver(
            &env,
            &[
                (test_boot_id, "boot-a"),
                (drmirror::failpoints::Hook::ExitOnSync.var(), "1"),
            ],
        );
        let d = start_config(&env, &toml);
        d.wait_log("initial sync complete", secs(120));
        let st = recv.wait_exit(secs(60));
        assert_eq!(st.code(), Some(3), "{}", recv.log_tail());
        assert!(!d.log().contains("target flushed"), "{}", d.log_tail());
        let boot = if restarted {
            let victim = env.d(files[17].strip_prefix(&env.src).expect("under src"));
            empty_keeping_mtime(&victim);
            "boot-b"
        } else {
            "boot-a"
        };
        let recv = tcp.receiver(&env, &[(test_boot_id, boot)]);
        if restarted {
            d.wait_log("comparing the whole target with the source again", secs(60));
            env.converge(&["--checksum"], &d);
        } else {
            d.wait_log("target flushed", secs(60));
            assert!(
                !d.log().contains("comparing the whole target"),
                "{}",
                d.log_tail()
            );
            env.converge(&["--checksum"], &d);
        }
        d.terminate();
        recv.terminate();
    }
}

/// A `tcp://` link that dies without a word (the DR side's interface goes
/// down: nothing answers, nothing resets) is found by both ends through
/// TCP keepalive and a user timeout (~45 s), not by the daemon's 5-minute
/// reply timeout, and the receiver frees the dead connection's slot: with
/// `--max-connections 1` the daemon's next connection is served once the
/// link is back. Before, the receiver kept the dead connection for good and
/// refused every later one.
#[test]
fn a_silently_dead_tcp_link_is_found_by_both_ends() {
    let env = Env::new();
    gen_tree(&env.s("t"), 40, 20);
    let Some(net) = NetNs::new() else {
        return;
    };
    let tcp = Tcp::new(&env);
    let recv = tcp.receiver_on(
        &env,
        net.command(bin()),
        &net.peer_ip,
        &[],
        &["--max-connections", "1"],
    );
    let target = tcp.target_toml(&env).replace("127.0.0.1", &net.peer_ip);
    let d = start_config(&env, &config(&env, &target, ""));
    env.converge(&[], &d);

    net.link(false);
    let cut = Instant::now();
    // Data in flight when the link died, and more changes after it.
    write(&env.s("big"), &pattern(4 << 20, 7));
    write(
        &env.s("t/after-the-cut"),
        b"written while the link was dead",
    );
    // Past the 45 s of the keepalive, well short of the 300 s reply
    // timeout that used to be the only way out.
    let line = d.wait_log("cannot reach", secs(150));
    eprintln!(
        "daemon: {:.0} s after the cut: {line}",
        cut.elapsed().as_secs_f64()
    );
    // The receiver ends the connection with the error of its last probe
    // ("Connection timed out", or "Network is unreachable" when its own
    // interface is the one down).
    let line = recv.wait_log("protocol error", secs(150));
    eprintln!(
        "receiver: {:.0} s after the cut: {line}",
        cut.elapsed().as_secs_f64()
    );
    assert!(line.contains(&format!("{}:", net.host_ip)), "{line}");

    net.link(true);
    env.converge(&["--checksum"], &d);
    assert!(
        !d.log().contains("connection limit"),
        "the receiver kept the dead connection's slot:\n{}",
        d.log_tail()
    );
    d.terminate();
    recv.terminate();
}

/// Reads `/proc/PID` figures: resident set in bytes, CPU seconds.
pub(crate) fn rss_and_cpu(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let cpu = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (rss_kb * 1024, cpu / tick)
}

fn backlog(port: u16, target: &str) -> f64 {
    let text = http_get(port, "/metrics").unwrap_or_default();
    metric(
        &text,
        &format!("drmirror_backlog_entries{{target=\"{target}\"}}"),
    )
}

/// The outage of acceptance 2: 100,000 writes to 20,000 files while the
/// receiver is gone; bounded memory, a coalesced backlog, and a catch-up
/// without restarting drmirror.
#[test]
fn ssh_outage_backlog_stays_on_disk_and_drains_by_itself() {
    let env = Env::new();
    let Some(mut sshd) = Sshd::start(&env.root) else {
        return;
    };
    const FILES: usize = 20_000;
    const DIRS: usize = 40;
    for i in 0..FILES {
        write(&env.s(format!("d{}/f{i}", i % DIRS)), b"v0");
    }
    let port = free_port();
    let top = format!("metrics_listen = \"127.0.0.1:{port}\"");
    let d = start_config(
        &env,
        &config(&env, &sshd.target_toml("dr", &env.dst, ""), &top),
    );
    d.wait_log("initial sync complete", secs(300));
    env.converge(&[], &d);

    sshd.stop(&env.root);
    let (_, cpu0) = rss_and_cpu(d.pid);
    let t_down = Instant::now();
    let mut rss_max = 0u64;
    for round in 1..=5 {
        for i in 0..FILES {
            write(
                &env.s(format!("d{}/f{i}", i % DIRS)),
                format!("v{round} {i}").as_bytes(),
            );
            if i % 2000 == 0 {
                rss_max = rss_max.max(rss_and_cpu(d.pid).0);
            }
        }
    }
    // Capture records the last writes; then the outage is quiet.
    wait_events_recorded(port, &d);
    let entries = backlog(port, "dr");
    // A quiet stretch of outage: the daemon must not spin.
    let (_, cpu_a) = rss_and_cpu(d.pid);
    let quiet = Instant::now();
    for _ in 0..10 {
        std::thread::sleep(ms(500));
        rss_max = rss_max.max(rss_and_cpu(d.pid).0);
    }
    let (_, cpu_b) = rss_and_cpu(d.pid);
    let idle_cpu = (cpu_b - cpu_a) / quiet.elapsed().as_secs_f64();
    let (_, cpu1) = rss_and_cpu(d.pid);
    let outage = t_down.elapsed();
    assert!(
        (FILES as f64..=(FILES + DIRS + 1) as f64).contains(&entries),
        "backlog should hold one entry per changed file ({FILES}), shows {entries}\n{}",
        d.log_tail()
    );
    assert!(
        rss_max < 150 << 20,
        "RSS reached {} MiB during the outage",
        rss_max >> 20
    );
    assert!(d.is_running(), "the daemon died during the outage");

    sshd.resume();
    let back = Instant::now();
    // Caught up: the backlog is empty (then checked with verify).
    let deadline = Instant::now() + secs(300);
    let mut reconnect = None;
    while backlog(port, "dr") > 0.0 || !env.verify(&[]).0 {
        assert!(Instant::now() < deadline, "no catch-up\n{}", d.log_tail());
        if reconnect.is_none() && d.log().contains("reconnected to") {
            reconnect = Some(back.elapsed());
        }
        std::thread::sleep(ms(100));
    }
    let catch_up = back.elapsed();
    let reconnect = reconnect.unwrap_or(catch_up);
    env.converge_for(&["--checksum"], &d, secs(60));
    assert!(d.is_running());
    eprintln!(
        "OUTAGE: files={FILES} writes={} backlog={entries} rss_max={:.1}MiB cpu_during_outage={:.2}s outage={:.1}s idle_cpu_share={:.3} catch_up={:.2}s (reconnected after {:.2}s)",
        FILES * 5,
        rss_max as f64 / (1 << 20) as f64,
        cpu1 - cpu0,
        outage.as_secs_f64(),
        idle_cpu,
        catch_up.as_secs_f64(),
        reconnect.as_secs_f64()
    );
    d.terminate();
}

/// A target that is down while the daemon starts: its startup comparison
/// cannot list the target, so it is redone once the target is back, and
/// what changed while drmirror was stopped (deletions included) arrives.
#[test]
fn a_target_down_at_start_is_compared_once_it_is_back() {
    let env = Env::new();
    let Some(mut sshd) = Sshd::start(&env.root) else {
        return;
    };
    for i in 0..200 {
        write(&env.s(format!("d{}/f{i}", i % 10)), b"v0");
    }
    let toml = config(&env, &sshd.target_toml("dr", &env.dst, ""), "");
    let d = start_config(&env, &toml);
    d.wait_log("initial sync complete", secs(120));
    env.converge(&[], &d);
    d.terminate();

    // While drmirror is stopped: deletions, a change, a new file.
    remove_file(&env.s("d3/f3"));
    remove_dir_all(&env.s("d7"));
    write(&env.s("d1/f1"), b"changed while stopped");
    write(&env.s("d9/new"), b"new while stopped");
    sshd.stop(&env.root);
    let d = start_config(&env, &toml);
    d.wait_log("startup scan done", secs(60));
    assert!(
        d.log().contains("cannot scan directory"),
        "the scan should report the unreachable target\n{}",
        d.log_tail()
    );
    sshd.resume();
    env.converge(&[], &d);
    assert!(!exists(&env.d("d3/f3")) && !exists(&env.d("d7")));
    d.terminate();
}

/// Two targets, one down: the live one keeps up, the other catches up later.
#[test]
fn a_down_target_does_not_hold_back_the_other() {
    let env = Env::new();
    let Some(mut sshd) = Sshd::start(&env.root) else {
        return;
    };
    let remote_dst = env.root.join("remote-dst");
    write(&env.s("seed"), b"seed");
    let targets = format!(
        "[[target]]\nname = \"local\"\npath = {}\n{}",
        toml_str(&env.dst),
        sshd.target_toml("far", &remote_dst, "")
    );
    let d = start_config(&env, &config(&env, &targets, ""));
    wait_converged(&env.src, &remote_dst, &[], Some(&d));
    sshd.stop(&env.root);
    let mut lags = Vec::new();
    for i in 0..40 {
        let p = env.s(format!("stream/f{i}"));
        let t0 = Instant::now();
        write(&p, format!("{i}").as_bytes());
        let q = env.d(format!("stream/f{i}"));
        let deadline = Instant::now() + secs(60);
        while !exists(&q) {
            assert!(
                Instant::now() < deadline,
                "the live target stalled while the other was down\n{}",
                d.log_tail()
            );
            std::thread::sleep(ms(5));
        }
        lags.push(t0.elapsed());
        std::thread::sleep(ms(100));
    }
    lags.sort();
    eprintln!(
        "TWO-TARGETS: live target lag p50={:?} p99={:?} max={:?} while the other was down",
        lags[lags.len() / 2],
        lags[lags.len() * 99 / 100],
        lags[lags.len() - 1]
    );
    env.converge(&[], &d);
    assert!(!exists(&remote_dst.join("stream/f0")));
    sshd.resume();
    wait_converged(&env.src, &remote_dst, &["--checksum"], Some(&d));
    env.converge(&["--checksum"], &d);
    d.terminate();
}

// ---------------------------------------------------------------- hostile input

/// `drmirror receive --root ROOT` on pipes, driven frame by frame.
struct Receiver {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    buf: Vec<u8>,
}

impl Receiver {
    fn start(root: &Path) -> Receiver {
        Receiver::start_logging(root, "error")
    }

    /// [`Receiver::start`] logging at `level` (on stderr).
    fn start_logging(root: &Path, level: &str) -> Receiver {
        let mut child = Command::new(bin())
            .args(["receive", "--root"])
            .arg(root)
            .env("RUST_LOG", level)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn receive");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Receiver {
            child,
            out,
            buf: Vec::new(),
        }
    }

    fn raw(&mut self, bytes: &[u8]) {
        let w = self.child.stdin.as_mut().expect("stdin");
        w.write_all(bytes).expect("write to receiver");
        w.flush().expect("flush");
    }

    fn send(&mut self, r: &Request) {
        let mut v = Vec::new();
        protocol::write_frame(&mut v, r).expect("encode");
        self.raw(&v);
    }

    fn reply(&mut self) -> Result<Reply, FrameError> {
        protocol::read_frame(&mut self.out, &mut self.buf)
    }

    /// Sends the Hello a daemon over ssh sends.
    fn send_hello(&mut self) {
        self.send(&Request::Hello {
            magic: MAGIC,
            version: VERSION,
            token: None,
            root: None,
        });
    }

    fn hello(root: &Path) -> Receiver {
        let mut r = Receiver::start(root);
        r.send_hello();
        assert!(matches!(r.reply(), Ok(Reply::Welcome { .. })));
        r
    }

    /// Closes stdin and returns the exit status and stderr.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().expect("wait receiver");
        (out.status, String::from_utf8_lossy(&out.stderr).to_string())
    }
}

fn file_meta(size: u64) -> Meta {
    Meta {
        kind: Kind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size,
        mtime_ns: 1_600_000_000_000_000_000,
        ctime_ns: 0,
        ino: 0,
        dev: 0,
        rdev: 0,
        nlink: 0,
    }
}

/// Sends one file in one batch and returns the batch's results.
/// The requests that send file `rel` with `data` (claimed checksum
/// `hash`) as stream `file` of `batch`.
fn file_requests(
    batch: u64,
    file: u64,
    rel: &[u8],
    data: &[u8],
    hash: protocol::ContentHash,
) -> [Request; 3] {
    [
        Request::Op {
            batch,
            op: Op::File {
                file,
                rel: rel.to_vec(),
                meta: file_meta(data.len() as u64),
                delta: false,
                xattrs: None,
            },
        },
        Request::Data {
            file,
            chunk: Chunk::Bytes(data.to_vec()),
        },
        Request::Data {
            file,
            chunk: Chunk::End { hash, commit: true },
        },
    ]
}

/// Ends `batch` and returns its results.
fn end_batch(r: &mut Receiver, batch: u64) -> Vec<Result<Done, String>> {
    r.send(&Request::EndBatch { batch });
    match r.reply() {
        Ok(Reply::Batch { results, .. }) => results,
        other => panic!("expected a batch reply, got {other:?}"),
    }
}

fn put(
    r: &mut Receiver,
    batch: u64,
    rel: &[u8],
    data: &[u8],
    hash: protocol::ContentHash,
) -> Vec<Result<Done, String>> {
    for req in file_requests(batch, batch, rel, data, hash) {
        r.send(&req);
    }
    end_batch(r, batch)
}

/// Sends one small file whole (`Op::Whole`, content `wire` as it goes on
/// the wire, zstd-compressed if `zstd`; `fresh`: the sender's word that
/// nothing is at `rel`) in one batch and returns the batch's results.
fn put_whole(
    r: &mut Receiver,
    batch: u64,
    rel: &[u8],
    wire: &[u8],
    zstd: bool,
    hash: protocol::ContentHash,
    fresh: bool,
) -> Vec<Result<Done, String>> {
    r.send(&Request::Op {
        batch,
        op: Op::Whole {
            rel: rel.to_vec(),
            meta: file_meta(wire.len() as u64),
            zstd,
            data: wire.to_vec(),
            hash,
            fresh,
            xattrs: None,
        },
    });
    end_batch(r, batch)
}

/// How a test sends a file's content.
#[derive(Clone, Copy, Debug)]
enum Way {
    /// `Op::File` and `Data` frames.
    Streamed,
    /// One `Op::Whole`, uncompressed.
    Whole,
    /// One `Op::Whole` marked fresh: the receiver may create it at its name.
    Fresh,
}

fn put_as(
    how: Way,
    r: &mut Receiver,
    batch: u64,
    rel: &[u8],
    data: &[u8],
    hash: protocol::ContentHash,
) -> Vec<Result<Done, String>> {
    match how {
        Way::Streamed => put(r, batch, rel, data, hash),
        Way::Whole => put_whole(r, batch, rel, data, false, hash, false),
        Way::Fresh => put_whole(r, batch, rel, data, false, hash, true),
    }
}

fn hash(data: &[u8]) -> protocol::ContentHash {
    protocol::content_hash(data)
}

/// Every file in `dir` (recursively), for "nothing written outside" checks.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v = walk(dir);
    v.sort();
    v
}

/// Pipelined batches are applied by several workers; a rename received
/// right after them (of the last batch's directory) sees all their files in
/// place.
#[test]
fn receiver_applies_pipelined_batches_then_a_rename_after_them() {
    let env = Env::new();
    let mut r = Receiver::hello(&env.dst);
    const BATCHES: u64 = 40;
    const FILES: u64 = 20;
    let body = |b: u64, i: u64| format!("batch {b} file {i}").into_bytes();
    for b in 0..BATCHES {
        for i in 0..FILES {
            let data = body(b, i);
            let rel = format!("d{b}/f{i}").into_bytes();
            for req in file_requests(b, b * 1000 + i, &rel, &data, hash(&data)) {
                r.send(&req);
            }
        }
        r.send(&Request::EndBatch { batch: b });
    }
    r.send(&Request::Rename {
        id: 9000,
        from: format!("d{}", BATCHES - 1).into_bytes(),
        to: b"moved".to_vec(),
    });
    r.send(&Request::Sync { id: 9001 });
    let (mut batches, mut renamed, mut synced) = (0, false, false);
    while batches < BATCHES || !renamed || !synced {
        match r.reply() {
            Ok(Reply::Batch { batch, results }) => {
                assert_eq!(results.len(), FILES as usize, "batch {batch}");
                assert!(results.iter().all(|x| x.is_ok()), "{results:?}");
                batches += 1;
            }
            Ok(Reply::Done { id: 9000, result }) => {
                assert_eq!(result, Ok(true), "rename");
                renamed = true;
            }
            Ok(Reply::Done { id: 9001, result }) => {
                assert!(result.is_ok(), "sync: {result:?}");
                synced = true;
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert!(
        !exists(&env.d(format!("d{}", BATCHES - 1))),
        "the renamed directory is still there"
    );
    for b in 0..BATCHES {
        let dir = if b == BATCHES - 1 {
            "moved".to_string()
        } else {
            format!("d{b}")
        };
        for i in 0..FILES {
            assert_eq!(
                read(&env.d(format!("{dir}/f{i}"))),
                body(b, i),
                "{dir}/f{i}"
            );
        }
    }
    let (status, err) = r.finish();
    assert!(status.success(), "{err}");
}

/// A worker reuses a batch's parent directory for its next file: a
/// directory renamed after the batch (and made again) must not receive the
/// files of later batches, whichever worker they go to.
#[test]
fn receiver_files_after_a_rename_land_under_the_new_directory_of_the_old_name() {
    let env = Env::new();
    let mut r = Receiver::hello(&env.dst);
    let results = put(&mut r, 0, b"d/first", b"1", hash(b"1"));
    assert!(results.iter().all(|x| x.is_ok()), "{results:?}");
    r.send(&Request::Rename {
        id: 100,
        from: b"d".to_vec(),
        to: b"e".to_vec(),
    });
    match r.reply() {
        Ok(Reply::Done { id: 100, result }) => assert_eq!(result, Ok(true), "rename"),
        other => panic!("expected the rename's reply, got {other:?}"),
    }
    // More batches than workers: one of them goes to batch 0's worker.
    for b in 1..=8u64 {
        let data = format!("later {b}").into_bytes();
        let rel = format!("d/later{b}").into_bytes();
        let results = put(&mut r, b, &rel, &data, hash(&data));
        assert!(results.iter().all(|x| x.is_ok()), "batch {b}: {results:?}");
    }
    assert_eq!(read(&env.d("e/first")), b"1");
    assert_eq!(
        listing(&env.d("e")),
        vec![PathBuf::from("first")],
        "a later file went into the renamed directory"
    );
    for b in 1..=8u64 {
        assert_eq!(
            read(&env.d(format!("d/later{b}"))),
            format!("later {b}").into_bytes()
        );
    }
    let (status, err) = r.finish();
    assert!(status.success(), "{err}");
}

/// The daemon goes away while batches, a rename and a sync are queued:
/// the receiver's workers fail on their replies and the receiver exits
/// instead of waiting for work that will never be done.
#[test]
fn receiver_exits_when_the_daemon_goes_away_mid_stream() {
    let env = Env::new();
    // Nobody reads the replies any more: the first one fails (EPIPE).
    let Receiver { mut child, out, .. } = Receiver::hello(&env.dst);
    drop(out);
    let mut stdin = child.stdin.take().expect("stdin");
    let mut frames = Vec::new();
    for b in 0..40u64 {
        for i in 0..20u64 {
            let data = format!("{b}/{i}").into_bytes();
            let rel = format!("d{b}/f{i}").into_bytes();
            for req in file_requests(b, b * 1000 + i, &rel, &data, hash(&data)) {
                protocol::write_frame(&mut frames, &req).expect("encode");
            }
        }
        protocol::write_frame(&mut frames, &Request::EndBatch { batch: b }).expect("encode");
        // Early: read (and queued for the sync thread, and waited on by
        // the rename) while the workers still hold batches.
        if b == 3 {
            protocol::write_frame(&mut frames, &Request::Sync { id: 1 }).expect("encode");
            protocol::write_frame(
                &mut frames,
                &Request::Rename {
                    id: 2,
                    from: b"d1".to_vec(),
                    to: b"moved".to_vec(),
                },
            )
            .expect("encode");
        }
    }
    // The receiver may stop reading first: a failed write is fine.
    let _ = stdin.write_all(&frames);
    drop(stdin);
    let deadline = Instant::now() + secs(30);
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            assert!(!st.success(), "a broken connection is an error exit");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the receiver hung after its daemon went away");
        }
        std::thread::sleep(ms(50));
    }
}

/// A daemon that comes back (after kill -9, or on a new connection after
/// a dead one) can reach the receiver while its previous session is still
/// applying what it had read. The new session is welcomed only once the
/// old one is done: nothing changes under the root behind its back (a
/// late directory created would leave its parent's mtime different from
/// what the new daemon just compared and recorded).
#[test]
fn a_new_session_waits_until_the_previous_one_on_its_root_is_done() {
    let env = Env::new();
    let mut a = Receiver::hello(&env.dst);
    let r = put(&mut a, 1, b"first", b"1", hash(b"1"));
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");

    let mut b = Receiver::start_logging(&env.dst, "info");
    b.send_hello();
    let Receiver {
        child: mut b_child,
        out: mut b_out,
        buf: mut b_buf,
    } = b;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(protocol::read_frame::<_, Reply>(&mut b_out, &mut b_buf));
    });
    // The old session is open (idle, its peer alive as far as it knows).
    assert!(
        rx.recv_timeout(secs(2)).is_err(),
        "a second session on the root was welcomed while the first was open"
    );

    // The old peer sends a pile of work and goes away without waiting.
    let Receiver {
        child: mut a_child,
        out: mut a_out,
        ..
    } = a;
    let drain = std::thread::spawn(move || std::io::copy(&mut a_out, &mut std::io::sink()));
    let mut frames = Vec::new();
    let mkdir = |frames: &mut Vec<u8>, batch: u64, rel: String| {
        let op = Op::Mkdir {
            rel: rel.into_bytes(),
        };
        protocol::write_frame(frames, &Request::Op { batch, op }).expect("encode");
    };
    for batch in 2..62u64 {
        mkdir(&mut frames, batch, format!("d{batch}"));
        for i in 0..50u64 {
            mkdir(&mut frames, batch, format!("d{batch}/s{i}"));
            let rel = format!("d{batch}/s{i}/f").into_bytes();
            for req in file_requests(batch, batch * 1000 + i, &rel, b"x", hash(b"x")) {
                protocol::write_frame(&mut frames, &req).expect("encode");
            }
        }
        protocol::write_frame(&mut frames, &Request::EndBatch { batch }).expect("encode");
    }
    let mut stdin = a_child.stdin.take().expect("stdin");
    stdin.write_all(&frames).expect("write to the old session");
    drop(stdin);

    match rx.recv_timeout(secs(60)) {
        Ok(Ok(Reply::Welcome { .. })) => {}
        other => panic!("expected the new session's Welcome, got {other:?}"),
    }
    let at_welcome = listing(&env.dst);
    let a_status = a_child.wait().expect("wait for the old session");
    let _ = drain.join();
    assert!(a_status.success(), "the old session: {a_status}");
    assert_eq!(
        listing(&env.dst),
        at_welcome,
        "the old session wrote after the new one was welcomed"
    );
    drop(b_child.stdin.take());
    let out = b_child
        .wait_with_output()
        .expect("wait for the new session");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("the previous session on this root ended"),
        "{log}"
    );
}

/// `Op::Whole` marked fresh: the receiver creates the file at its name,
/// with the sender's content, mode and mtime; and never over anything
/// already there (a file, a symlink, a directory), which it replaces as if
/// the mark were absent, without following the symlink.
#[test]
fn a_fresh_whole_file_is_created_at_its_name_and_never_over_what_is_there() {
    let env = Env::new();
    let outside = env.root.join("outside");
    mkdirp(&outside);
    write(&outside.join("target"), b"untouched");
    mkdirp(&env.d("dir/sub/inner"));
    write(&env.d("dir/old"), b"the previous copy");
    symlink(outside.join("target"), &env.d("dir/link"));
    let mut r = Receiver::hello(&env.dst);
    for (i, name) in ["new", "old", "link", "sub"].into_iter().enumerate() {
        let body = format!("fresh content of {name}").into_bytes();
        // 0o666 is more than the receiver's umask lets a create give.
        let meta = Meta {
            mode: 0o666,
            mtime_ns: 1_500_000_000_123_456_789,
            ..file_meta(body.len() as u64)
        };
        let batch = 10 + i as u64;
        r.send(&Request::Op {
            batch,
            op: Op::Whole {
                rel: format!("dir/{name}").into_bytes(),
                meta,
                zstd: false,
                hash: hash(&body),
                data: body.clone(),
                fresh: true,
                xattrs: None,
            },
        });
        let res = end_batch(&mut r, batch);
        assert!(res[0].is_ok(), "{name}: {res:?}");
        let p = env.d(format!("dir/{name}"));
        let m = lmeta(&p);
        assert!(m.file_type().is_file(), "{name} is not a regular file");
        assert_eq!(read(&p), body, "{name}");
        assert_eq!(m.mode() & 0o7777, 0o666, "{name}");
        assert_eq!(
            (m.mtime(), m.mtime_nsec()),
            (1_500_000_000, 123_456_789),
            "{name}"
        );
    }
    assert_eq!(read(&outside.join("target")), b"untouched");
    let mut names: Vec<_> = std::fs::read_dir(env.d("dir"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["link", "new", "old", "sub"],
        "temp files left behind"
    );
    let (st, err) = r.finish();
    assert!(st.success(), "{err}");
}

/// A fresh file that fills the disk: a clear error naming the cause,
/// nothing left at its name, and the receiver goes on serving.
#[test]
fn a_fresh_file_that_does_not_fit_leaves_nothing_at_its_name() {
    if !is_root() {
        eprintln!("SKIP: mounting a small tmpfs needs root");
        return;
    }
    let env = Env::new();
    let Some(_m) = mount_with("tmpfs", "size=32k", &env.dst) else {
        return;
    };
    let mut r = Receiver::hello(&env.dst);
    let big = vec![0x5a; 60 * 1024];
    let res = put_as(Way::Fresh, &mut r, 1, b"big", &big, hash(&big));
    let err = res[0]
        .as_ref()
        .expect_err("60 KiB fit in a 32 KiB filesystem");
    assert!(err.contains("No space left"), "{err}");
    assert!(
        !exists(&env.d("big")),
        "a partial file was left at its name"
    );
    let res = put_as(Way::Fresh, &mut r, 2, b"small", b"fits", hash(b"fits"));
    assert!(res[0].is_ok(), "{res:?}");
    assert_eq!(read(&env.d("small")), b"fits");
    let (st, err) = r.finish();
    assert!(st.success(), "{err}");
}

#[test]
fn receiver_refuses_paths_that_leave_its_root_and_keeps_serving() {
    let env = Env::new();
    let outside = env.root.join("outside");
    mkdirp(&outside);
    write(&outside.join("victim"), b"untouched");
    // A symlink inside the root pointing out of it.
    symlink(&outside, &env.d("escape"));
    let before = listing(&outside);

    let mut r = Receiver::hello(&env.dst);
    let evil: Vec<Vec<u8>> = vec![
        b"../outside/victim".to_vec(),
        b"a/../../outside/victim".to_vec(),
        format!("{}/victim", outside.display()).into_bytes(),
        b"/etc/drmirror-test-should-not-exist".to_vec(),
        b"a//b".to_vec(),
        b"a/./b".to_vec(),
        b"nul\0byte".to_vec(),
    ];
    symlink(&outside, &env.d("escape2"));
    symlink(&outside, &env.d("escape3"));
    // Every way a file's content travels: streamed, whole in one frame, and
    // whole created at its name.
    for (how, escape, base) in [
        (Way::Streamed, "escape", 100u64),
        (Way::Whole, "escape2", 1100),
        (Way::Fresh, "escape3", 2100),
    ] {
        for (i, rel) in evil.iter().enumerate() {
            let res = put_as(how, &mut r, base + i as u64, rel, b"evil", hash(b"evil"));
            assert_eq!(res.len(), 1);
            let err = res[0].as_ref().expect_err("a hostile path was accepted");
            assert!(err.contains("refused path"), "{how:?}: {err}");
        }
        // Through the symlink: the receiver never follows it. The mirror
        // holds a directory there (the sender says so), so the link is
        // replaced inside the root; nothing lands outside.
        let rel = format!("{escape}/victim").into_bytes();
        let res = put_as(how, &mut r, base + 100, &rel, b"evil", hash(b"evil"));
        assert!(res[0].is_ok(), "{how:?}: {res:?}");
        assert_eq!(read(&outside.join("victim")), b"untouched");
        assert!(!lmeta(&env.d(escape)).file_type().is_symlink());
    }
    // Renames and deletes out of the root are refused too.
    r.send(&Request::Rename {
        id: 7,
        from: b"../outside/victim".to_vec(),
        to: b"stolen".to_vec(),
    });
    match r.reply() {
        Ok(Reply::Done { result: Err(e), .. }) => assert!(e.contains("refused path"), "{e}"),
        other => panic!("rename out of the root: {other:?}"),
    }
    r.send(&Request::Op {
        batch: 300,
        op: Op::Delete {
            rel: b"../outside".to_vec(),
        },
    });
    r.send(&Request::EndBatch { batch: 300 });
    match r.reply() {
        Ok(Reply::Batch { results, .. }) => assert!(results[0].is_err(), "{results:?}"),
        other => panic!("{other:?}"),
    }
    // A wrong content checksum: not installed.
    for (how, batch) in [(Way::Streamed, 400), (Way::Whole, 401), (Way::Fresh, 407)] {
        let res = put_as(how, &mut r, batch, b"bad-hash", b"data", hash(b"other"));
        assert!(
            res[0].as_ref().is_err_and(|e| e.contains("checksum")),
            "{how:?}: {res:?}"
        );
        assert!(!exists(&env.d("bad-hash")));
    }
    // Whole files: content past the size limit, raw or compressed (a
    // zstd bomb: 64 MiB of zeros in a few KiB), and compressed garbage.
    let big = vec![7u8; protocol::WHOLE_MAX as usize + 1];
    let res = put_whole(&mut r, 402, b"too-big", &big, false, hash(&big), false);
    assert!(
        res[0].as_ref().is_err_and(|e| e.contains("limit")),
        "{res:?}"
    );
    // Just over the limit within an acceptable window: inflated up to the
    // limit, then refused.
    let zeros = vec![0u8; 2 * protocol::WHOLE_MAX as usize];
    let over = zstd::bulk::compress(&zeros, 1).expect("compress");
    let res = put_whole(&mut r, 403, b"bomb", &over, true, hash(&zeros), false);
    assert!(
        res[0].as_ref().is_err_and(|e| e.contains("limit")),
        "{res:?}"
    );
    // A bomb whose window alone is far beyond a whole file: refused
    // before the decoder reserves it.
    let zeros = vec![0u8; 64 << 20];
    let bomb = zstd::bulk::compress(&zeros, 19).expect("compress");
    assert!(bomb.len() < 1 << 20);
    let res = put_whole(&mut r, 406, b"bomb", &bomb, true, hash(&zeros), false);
    assert!(
        res[0]
            .as_ref()
            .is_err_and(|e| e.contains("bad compressed content")),
        "{res:?}"
    );
    let res = put_whole(
        &mut r,
        404,
        b"garbage",
        b"not zstd at all",
        true,
        hash(b""),
        false,
    );
    assert!(
        res[0].as_ref().is_err_and(|e| e.contains("bad compressed")),
        "{res:?}"
    );
    for name in ["too-big", "bomb", "garbage"] {
        assert!(!exists(&env.d(name)), "{name} was installed");
    }
    // A good whole file, compressed, is installed with its content.
    let text = b"line of text\n".repeat(100);
    let z = zstd::bulk::compress(&text, 3).expect("compress");
    let res = put_whole(&mut r, 405, b"good/whole", &z, true, hash(&text), false);
    assert!(res[0].is_ok(), "{res:?}");
    assert_eq!(read(&env.d("good/whole")), text);
    // And the connection still serves a good request.
    let res = put(&mut r, 500, b"good/file", b"fine", hash(b"fine"));
    assert!(res[0].is_ok(), "{res:?}");
    assert_eq!(read(&env.d("good/file")), b"fine");
    let (st, err) = r.finish();
    assert!(st.success(), "{err}");
    assert_eq!(
        listing(&outside),
        before,
        "something was written outside the root"
    );
    assert_eq!(read(&outside.join("victim")), b"untouched");
    assert!(!Path::new("/etc/drmirror-test-should-not-exist").exists());
}

#[test]
fn receiver_rejects_bad_frames_with_a_clear_error() {
    let env = Env::new();
    // Unknown protocol version.
    let mut r = Receiver::start(&env.dst);
    r.send(&Request::Hello {
        magic: MAGIC,
        version: VERSION + 100,
        token: None,
        root: None,
    });
    match r.reply() {
        Ok(Reply::Refused { reason }) => assert!(reason.contains("version"), "{reason}"),
        other => panic!("unknown version: {other:?}"),
    }
    let (st, err) = r.finish();
    assert!(!st.success());
    assert!(err.contains("version"), "{err}");

    // A target naming another directory than the one this receiver serves
    // (two tcp:// targets must not share a tree by accident).
    let mut r = Receiver::start(&env.dst);
    r.send(&Request::Hello {
        magic: MAGIC,
        version: VERSION,
        token: None,
        root: Some(env.src.as_os_str().as_encoded_bytes().to_vec()),
    });
    match r.reply() {
        Ok(Reply::Refused { reason }) => assert!(reason.contains("serves"), "{reason}"),
        other => panic!("another root: {other:?}"),
    }
    let (st, _) = r.finish();
    assert!(!st.success());
    // The same directory spelt differently is accepted.
    let mut r = Receiver::start(&env.dst);
    r.send(&Request::Hello {
        magic: MAGIC,
        version: VERSION,
        token: None,
        root: Some(format!("{}/.", env.dst.display()).into_bytes()),
    });
    assert!(matches!(r.reply(), Ok(Reply::Welcome { .. })));
    let (st, err) = r.finish();
    assert!(st.success(), "{err}");

    // Not a drmirror client at all.
    let mut r = Receiver::start(&env.dst);
    r.raw(b"SSH-2.0-OpenSSH_9.2\r\n");
    assert!(matches!(r.reply(), Ok(Reply::Refused { .. })));
    let (st, _) = r.finish();
    assert!(!st.success());

    // Bad crc.
    let mut r = Receiver::hello(&env.dst);
    let mut f = Vec::new();
    protocol::write_frame(&mut f, &Request::Sync { id: 1 }).expect("encode");
    let last = f.len() - 1;
    f[last] ^= 0x40;
    r.raw(&f);
    match r.reply() {
        Ok(Reply::Fatal { reason }) => assert!(reason.contains("checksum"), "{reason}"),
        other => panic!("bad crc: {other:?}"),
    }
    let (st, err) = r.finish();
    assert!(!st.success());
    assert!(err.contains("checksum"), "{err}");

    // Oversized length: refused without trying to read (or allocate) it.
    let mut r = Receiver::hello(&env.dst);
    let mut f = u32::MAX.to_le_bytes().to_vec();
    f.extend_from_slice(&[0; 4]);
    r.raw(&f);
    match r.reply() {
        Ok(Reply::Fatal { reason }) => assert!(reason.contains("exceeds"), "{reason}"),
        other => panic!("oversized: {other:?}"),
    }
    r.finish();

    // A valid frame whose payload is garbage.
    let mut r = Receiver::hello(&env.dst);
    r.raw(&protocol::frame_of_payload(&[0xffu8; 16]));
    match r.reply() {
        Ok(Reply::Fatal { reason }) => assert!(reason.contains("malformed"), "{reason}"),
        other => panic!("garbage payload: {other:?}"),
    }
    r.finish();

    // Truncated: the stream ends inside a frame.
    let mut r = Receiver::hello(&env.dst);
    let mut f = Vec::new();
    protocol::write_frame(
        &mut f,
        &Request::Stat {
            id: 1,
            rel: b"x".to_vec(),
        },
    )
    .expect("encode");
    r.raw(&f[..f.len() - 2]);
    let (st, err) = r.finish();
    assert!(!st.success());
    assert!(err.contains("in the middle of a frame"), "{err}");

    // Data for a file that was never opened: a protocol violation.
    let mut r = Receiver::hello(&env.dst);
    r.send(&Request::Data {
        file: 9,
        chunk: Chunk::Bytes(b"x".to_vec()),
    });
    assert!(matches!(r.reply(), Ok(Reply::Fatal { .. })));
    r.finish();
    assert!(listing(&env.dst).is_empty(), "{:?}", listing(&env.dst));
}

/// Acceptance 3: more distinct changes during an outage than
/// `backlog.max_entries`: they collapse into directory rescans, the backlog
/// stays near the bound, and the target still ends equal to the source.
#[test]
fn backlog_over_its_bound_collapses_and_still_converges() {
    let env = Env::new();
    let Some(mut sshd) = Sshd::start(&env.root) else {
        return;
    };
    const MAX: usize = 200;
    const DIRS: usize = 10;
    for i in 0..1000 {
        write(&env.s(format!("d{}/f{i}", i % DIRS)), b"v0");
    }
    let port = free_port();
    let top = format!("metrics_listen = \"127.0.0.1:{port}\"\n[backlog]\nmax_entries = {MAX}");
    let d = start_config(
        &env,
        &config(&env, &sshd.target_toml("dr", &env.dst, ""), &top),
    );
    d.wait_log("initial sync complete", secs(120));
    env.converge(&[], &d);
    sshd.stop(&env.root);
    // 3,000 distinct paths: changes, new files, deletions, new directories.
    for i in 0..1000 {
        write(&env.s(format!("d{}/f{i}", i % DIRS)), b"v1 changed");
        write(&env.s(format!("d{}/new{i}", i % DIRS)), b"new");
        write(&env.s(format!("n{}/g{i}", i % 7)), b"in a new dir");
    }
    for i in (0..1000).step_by(3) {
        remove_file(&env.s(format!("d{}/f{i}", i % DIRS)));
    }
    wait_events_recorded(port, &d);
    // Counted about once a second.
    std::thread::sleep(secs(2));
    let entries = backlog(port, "dr");
    let text = http_get(port, "/metrics").unwrap_or_default();
    assert!(
        metric(&text, "drmirror_backlog_collapsed_total") > 0.0,
        "nothing collapsed\n{}",
        d.log_tail()
    );
    assert!(
        entries <= (2 * MAX + 2 * DIRS) as f64,
        "backlog {entries} went far past its bound {MAX}\n{}",
        d.log_tail()
    );
    assert!(d.log().contains("reached its bound"), "{}", d.log_tail());
    sshd.resume();
    env.converge_for(&["--checksum"], &d, secs(180));
    eprintln!("COLLAPSE: bound={MAX} distinct_changes=3334 backlog_during_outage={entries}");
    d.terminate();
}
