//! The client listeners: MQTT over TCP (`--listen`), TLS (`--tls-listen`), WebSocket (`--ws-listen`)
//! and WebSocket over TLS (`--wss-listen`), checked together, in the order the runtime binds them, and
//! the TLS settings (re-read on SIGHUP).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use shardmq_transport::{
    tls, ListenerKind, TlsFiles, TlsSlot, TransportConfig, TransportCounters, WsSettings,
};

/// What the command line says about listeners.
#[derive(Debug, Clone, Default)]
pub struct ListenerArgs {
    pub listen: Vec<String>,
    pub tls_listen: Vec<String>,
    pub ws_listen: Vec<String>,
    pub wss_listen: Vec<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub tls_cn_as_username: bool,
    pub ws_path: Option<String>,
    pub max_packet_size: u32,
}

/// The listeners, checked.
#[derive(Debug)]
pub struct Listeners {
    /// Every address, in the order given to the runtime.
    pub addrs: Vec<SocketAddr>,
    pub kinds: Vec<ListenerKind>,
    pub tls_files: Option<TlsFiles>,
    pub transport: TransportConfig,
}

/// The default when no listener flag is given at all, as Mosquitto does.
const DEFAULT_LISTEN: &str = "0.0.0.0:1883";

impl ListenerArgs {
    pub fn setup(&self) -> Result<Listeners> {
        let any = !(self.listen.is_empty()
            && self.tls_listen.is_empty()
            && self.ws_listen.is_empty()
            && self.wss_listen.is_empty());
        let plain = if any { self.listen.clone() } else { vec![DEFAULT_LISTEN.to_string()] };
        let mut addrs = Vec::new();
        let mut kinds = Vec::new();
        for (flag, list, kind) in [
            ("--listen", &plain, ListenerKind::Mqtt),
            ("--tls-listen", &self.tls_listen, ListenerKind::Tls),
            ("--ws-listen", &self.ws_listen, ListenerKind::Ws),
            ("--wss-listen", &self.wss_listen, ListenerKind::Wss),
        ] {
            for a in resolve(flag, list)? {
                addrs.push(a);
                kinds.push(kind);
            }
        }
        let needs_tls = kinds.iter().any(|k| matches!(k, ListenerKind::Tls | ListenerKind::Wss));
        let tls_files = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                if !needs_tls {
                    bail!("--tls-cert and --tls-key are given but no --tls-listen or --wss-listen uses them");
                }
                Some(TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: self.tls_client_ca.clone() })
            }
            (None, None) if needs_tls => {
                bail!("--tls-listen and --wss-listen need --tls-cert FILE and --tls-key FILE")
            }
            (None, None) => None,
            (Some(_), None) => bail!("--tls-cert needs --tls-key"),
            (None, Some(_)) => bail!("--tls-key needs --tls-cert"),
        };
        if self.tls_client_ca.is_some() && tls_files.is_none() {
            bail!("--tls-client-ca needs --tls-cert, --tls-key and a --tls-listen or --wss-listen");
        }
        if self.tls_cn_as_username && self.tls_client_ca.is_none() {
            bail!("--tls-cn-as-username needs --tls-client-ca (client certificates are what it reads)");
        }
        if let Some(p) = &self.ws_path {
            if !p.starts_with('/') {
                bail!("--ws-path must start with '/', not {p:?}");
            }
            if self.ws_listen.is_empty() && self.wss_listen.is_empty() {
                bail!("--ws-path is given but no --ws-listen or --wss-listen uses it");
            }
        }
        let tls = match &tls_files {
            Some(f) => Some(Arc::new(TlsSlot::new(tls::load(f).context("TLS settings")?))),
            None => None,
        };
        let transport = TransportConfig {
            listeners: kinds.clone().into(),
            tls,
            ws: WsSettings {
                path: self.ws_path.as_deref().map(Into::into),
                // A frame may carry one whole packet of the largest size, plus a little.
                max_frame_bytes: self.max_packet_size as usize + 64,
            },
            cn_as_username: self.tls_cn_as_username,
            counters: Arc::new(TransportCounters::default()),
        };
        Ok(Listeners { addrs, kinds, tls_files, transport })
    }
}

impl Listeners {
    /// Listeners where a client cannot get in without a certificate the operator's CA signed: these
    /// need no password file to be safe on a network.
    pub fn authenticated(&self, i: usize) -> bool {
        matches!(self.kinds[i], ListenerKind::Tls | ListenerKind::Wss)
            && self.tls_files.as_ref().is_some_and(|f| f.client_ca.is_some())
    }

    /// Reads the certificate, key and client CAs again; connections accepted from now on use them.
    pub fn reload_tls(&self) -> Result<bool> {
        let (Some(files), Some(slot)) = (&self.tls_files, &self.transport.tls) else { return Ok(false) };
        slot.replace(tls::load(files)?);
        Ok(true)
    }

    /// ` tls=a,b ws=c wss=d` for the start-up line: which bound address speaks what.
    pub fn describe(&self, bound: &[SocketAddr]) -> String {
        let mut out = String::new();
        for (kind, name) in [(ListenerKind::Tls, "tls"), (ListenerKind::Ws, "ws"), (ListenerKind::Wss, "wss")]
        {
            let list: Vec<String> = bound
                .iter()
                .zip(&self.kinds)
                .filter(|(_, k)| **k == kind)
                .map(|(a, _)| a.to_string())
                .collect();
            if !list.is_empty() {
                out.push_str(&format!(" {name}={}", list.join(",")));
            }
        }
        out
    }
}

pub fn resolve(flag: &str, list: &[String]) -> Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::with_capacity(list.len());
    for l in list {
        let addr = l
            .to_socket_addrs()
            .with_context(|| format!("{flag} {l:?}"))?
            .next()
            .with_context(|| format!("{flag} {l:?} resolves to no address"))?;
        out.push(addr);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../transport/tests/certs")
    }

    fn base() -> ListenerArgs {
        ListenerArgs { max_packet_size: 1 << 20, ..Default::default() }
    }

    #[test]
    fn default_listener_only_without_any_listener_flag() {
        let l = base().setup().unwrap();
        assert_eq!(l.addrs, vec!["0.0.0.0:1883".parse().unwrap()]);
        let l = ListenerArgs { ws_listen: vec!["127.0.0.1:0".into()], ..base() }.setup().unwrap();
        assert_eq!(l.kinds, vec![ListenerKind::Ws]);
    }

    #[test]
    fn tls_flags_must_go_together() {
        let d = certs();
        let tls = ListenerArgs { tls_listen: vec!["127.0.0.1:0".into()], ..base() };
        assert!(tls.setup().unwrap_err().to_string().contains("--tls-cert"));
        let with_files = ListenerArgs {
            tls_cert: Some(d.join("server.pem")),
            tls_key: Some(d.join("server.key")),
            ..tls.clone()
        };
        let l = with_files.setup().unwrap();
        assert!(!l.authenticated(0));
        let cn = ListenerArgs { tls_cn_as_username: true, ..with_files.clone() };
        assert!(cn.setup().unwrap_err().to_string().contains("--tls-client-ca"));
        let mtls = ListenerArgs { tls_client_ca: Some(d.join("ca.pem")), ..cn };
        assert!(mtls.setup().unwrap().authenticated(0));
        let unused = ListenerArgs { tls_listen: vec![], listen: vec!["127.0.0.1:0".into()], ..with_files };
        assert!(unused.setup().is_err());
        let bad_path =
            ListenerArgs { ws_listen: vec!["127.0.0.1:0".into()], ws_path: Some("mqtt".into()), ..base() };
        assert!(bad_path.setup().unwrap_err().to_string().contains("--ws-path"));
    }

    #[test]
    fn a_bad_certificate_file_is_named() {
        let d = certs();
        let a = ListenerArgs {
            tls_listen: vec!["127.0.0.1:0".into()],
            tls_cert: Some(d.join("nope.pem")),
            tls_key: Some(d.join("server.key")),
            ..base()
        };
        let e = format!("{:#}", a.setup().err().unwrap());
        assert!(e.contains("nope.pem"), "{e}");
    }
}
