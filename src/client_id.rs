//! The kiosk's MQTT client id: the configured one, else one made on first
//! start from the machine's name and kept in the queue's meta table.

use crate::config::Config;
use crate::error::Result;
use crate::queue::Queue;

/// The configured client id, else the one made on first start and kept in the database.
pub fn client_id(config: &Config, queue: &Queue) -> Result<String> {
    if let Some(id) = &config.mqtt.client_id {
        return Ok(id.clone());
    }
    if let Some(id) = queue.meta("client_id")? {
        return Ok(id);
    }
    let id = format!(
        "holosync-{}-{:08x}",
        hostname(),
        crate::random::u64() as u32
    );
    queue.set_meta("client_id", &id)?;
    log::info!("made a new MQTT client id {id}; it is kept in the database and reused");
    Ok(id)
}

/// The machine's name, reduced to characters every broker accepts in a client id.
pub fn hostname() -> String {
    let raw = std::env::var("COMPUTERNAME")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    client_id_part(&raw)
}

/// `raw` (a host name) as a part of a client id: ASCII letters, digits and
/// dashes, at most 32, lower case; "kiosk" if nothing is left.
fn client_id_part(raw: &str) -> String {
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(32)
        .collect();
    if clean.is_empty() {
        "kiosk".into()
    } else {
        clean.to_ascii_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_name_becomes_a_safe_client_id_part() {
        assert_eq!(client_id_part("Lobby-PC-1\n"), "lobby-pc-1");
        assert_eq!(client_id_part(" kiosk_2.mall.local "), "kiosk2malllocal");
        assert_eq!(client_id_part("Ünïcode-Ø"), "ncode-");
        assert_eq!(client_id_part(&"a".repeat(40)), "a".repeat(32));
        assert_eq!(client_id_part("___"), "kiosk");
        assert_eq!(client_id_part(""), "kiosk");
    }

    #[test]
    fn the_host_name_is_the_machines() {
        if std::env::var_os("COMPUTERNAME").is_some() {
            return;
        }
        let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") else {
            return;
        };
        assert_eq!(hostname(), client_id_part(&name));
        assert!(!hostname().is_empty());
    }
}
