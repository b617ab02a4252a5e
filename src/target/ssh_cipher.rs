//! Which cipher drmirror asks ssh to prefer.
//!
//! OpenSSH puts ChaCha20-Poly1305 first because it is fast and constant-time
//! in plain software. On a CPU with AES and carry-less multiply
//! instructions, AES-GCM runs in hardware and costs far less: in
//! `tools/bench-remote`'s initial sync of 200,000 small files the ssh client
//! and sshd together used about a third less CPU with it, and the sync took
//! ~13% less time. Both ends encrypt every byte, so on a fast link this is a
//! large share of a mirror's CPU.
//!
//! The preference only reorders: drmirror passes `-o Ciphers=LIST` where
//! LIST is the very set ssh would offer, with the AES-GCM ciphers moved to
//! the front, and only when the user has not chosen the ciphers anywhere
//! (in `ssh_args`, or in an `ssh_config` file: `ssh -G` tells). The server
//! still picks among the same ciphers, so a host that refuses AES-GCM
//! negotiates the next one as before.

use std::process::{Child, Command, Stdio};

/// The AES-GCM ciphers, in the order drmirror prefers them.
const AES_GCM: [&str; 2] = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"];

/// Whether this CPU runs AES-GCM in hardware.
pub fn cpu_has_aes_gcm() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Whether ssh arguments choose the ciphers themselves (`-c`, or an `-o`
/// with the `Ciphers` option in any of ssh's spellings).
pub fn chosen_in_args(args: &[String]) -> bool {
    let names_ciphers = |opt: &str| {
        let key = opt
            .trim_start()
            .split(|c: char| c == '=' || c.is_whitespace())
            .next()
            .unwrap_or("");
        key.eq_ignore_ascii_case("ciphers")
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-c" || a == "-o" {
            match it.next() {
                Some(v) if a == "-o" && !names_ciphers(v) => {}
                _ => return true,
            }
        } else if let Some(rest) = a.strip_prefix("-o") {
            if names_ciphers(rest) {
                return true;
            }
        } else if a.starts_with("-c") {
            return true;
        }
    }
    false
}

/// `list` (ssh's comma-separated cipher list) with the AES-GCM ciphers it
/// holds moved to the front; `None` when it holds none, or has them first
/// already.
pub fn aes_gcm_first(list: &str) -> Option<String> {
    let all: Vec<&str> = list.split(',').filter(|c| !c.is_empty()).collect();
    let gcm: Vec<&str> = AES_GCM
        .iter()
        .copied()
        .filter(|g| all.contains(g))
        .collect();
    if gcm.is_empty() || all.starts_with(&gcm) {
        return None;
    }
    let rest = all.iter().copied().filter(|c| !gcm.contains(c));
    Some(
        gcm.iter()
            .copied()
            .chain(rest)
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// `ssh -G` (which prints the configuration ssh would use, and connects
/// nowhere) for `dest`, started.
fn show_config(args: &[String], dest: &[String]) -> Option<Child> {
    Command::new("ssh")
        .arg("-G")
        .args(args)
        .args(dest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// The cipher list in the output of [`show_config`].
fn ciphers_of(child: Option<Child>) -> Option<String> {
    let out = child?.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("ciphers ").map(|v| v.trim().to_string()))
}

/// The `Ciphers` value to pass to ssh for `dest` (its `[-p PORT]
/// [user@]host` arguments), or `None` to leave ssh's choice alone: the CPU
/// lacks AES instructions, the user chose the ciphers (in `args` or in an
/// `ssh_config`), or ssh has no AES-GCM to offer.
pub fn preferred(args: &[String], dest: &[String]) -> Option<String> {
    if !cpu_has_aes_gcm() || chosen_in_args(args) {
        return None;
    }
    let configured = show_config(args, dest);
    // With no configuration file at all: ssh's built-in list. A different
    // list means someone configured the ciphers for this host.
    let builtin = show_config(&["-F".into(), "/dev/null".into()], dest);
    let (configured, builtin) = (ciphers_of(configured)?, ciphers_of(builtin)?);
    if configured != builtin {
        return None;
    }
    aes_gcm_first(&configured)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_cipher_choice_is_seen_in_every_spelling() {
        for a in [
            &["-c", "aes256-ctr"][..],
            &["-caes256-ctr"],
            &["-o", "Ciphers=aes256-ctr"],
            &["-o", "ciphers aes256-ctr"],
            &["-oCiphers=+aes256-cbc"],
            &["-p", "22", "-o", " CIPHERS=x"],
            // A dangling option: ssh refuses it anyway; not ours to add to.
            &["-o"],
        ] {
            assert!(chosen_in_args(&args(a)), "{a:?}");
        }
        for a in [
            &[][..],
            &["-o", "ProxyJump=bastion"],
            &["-oCompression=no", "-v"],
            &["-o", "CiphersX=1"],
            &["-o", "Ciphers2 y"],
        ] {
            assert!(!chosen_in_args(&args(a)), "{a:?}");
        }
    }

    #[test]
    fn aes_gcm_moves_to_the_front_of_the_same_set() {
        assert_eq!(
            aes_gcm_first(
                "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com"
            )
            .as_deref(),
            Some("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr")
        );
        // Only the one the list holds.
        assert_eq!(
            aes_gcm_first("chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes256-ctr")
                .as_deref(),
            Some("aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-ctr")
        );
        assert_eq!(
            aes_gcm_first("chacha20-poly1305@openssh.com,aes256-ctr"),
            None
        );
        assert_eq!(
            aes_gcm_first("aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr"),
            None
        );
    }
}
