//! Who may open an association, and how many at once.
//!
//! Decided from the A-ASSOCIATE-RQ before dicom-ul negotiates presentation contexts:
//! 1. the called AE title must be ours (else service-user reason 7);
//! 2. when an allow list is configured, the calling AE title and source address must be on
//!    it (else service-user reason 3, "calling AE title not recognized"); an entry with a
//!    `tls_client_name` matches only a TLS association whose verified client certificate
//!    carries that name ([`Gatekeeper::admit_as`]);
//! 3. a global limit and a per-peer limit (calling AE title + address), both answered with
//!    source 3 (service-provider, presentation) reason 2, "local limit exceeded", transient.
//!
//! A granted association holds a [`Permit`]; dropping it frees its slots.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource,
};

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ae_title: String,
    pub host: IpAddr,
    /// Overrides the per-peer limit for this peer.
    pub max_associations: Option<u32>,
    /// Matches only over TLS with a verified client certificate carrying this name (DNS
    /// SAN or subject CN, `gateway_tls::peer_names`).
    pub tls_client_name: Option<String>,
}

/// Association policy settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    pub ae_title: String,
    pub max_associations: u32,
    pub max_associations_per_peer: u32,
    /// Empty: any calling AE title from any address.
    pub peers: Vec<Peer>,
}

/// Why an association was refused (also the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    CalledAeTitle,
    CallingAeTitle,
    GlobalLimit,
    PeerLimit,
    /// The gateway is disabled (remote `disable` or `wipe`): every association is refused
    /// until it is enabled again.
    Disabled,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::CalledAeTitle => "called_ae_title",
            Refusal::CallingAeTitle => "calling_ae_title",
            Refusal::GlobalLimit => "global_limit",
            Refusal::PeerLimit => "peer_limit",
            Refusal::Disabled => "disabled",
        }
    }

    /// The A-ASSOCIATE-RJ that says so.
    pub fn pdu(self) -> AssociationRJ {
        match self {
            Refusal::CalledAeTitle => AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CalledAETitleNotRecognized,
                ),
            },
            Refusal::CallingAeTitle => AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CallingAETitleNotRecognized,
                ),
            },
            // No A-ASSOCIATE-RJ reason says "administratively disabled": rejected-transient
            // (it ends with `enable`), by the service user, no reason given. The local log
            // and the metric label say `disabled`.
            Refusal::Disabled => AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::NoReasonGiven,
                ),
            },
            Refusal::GlobalLimit | Refusal::PeerLimit => AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            },
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_peer: HashMap<(String, IpAddr), u32>,
}

/// Applies the policy and counts live associations.
#[derive(Debug, Clone)]
pub struct Gatekeeper {
    settings: Arc<PolicySettings>,
    counts: Arc<Mutex<Counts>>,
}

/// A granted association slot.
#[derive(Debug)]
pub struct Permit {
    key: (String, IpAddr),
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_peer.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_peer.remove(&self.key);
            }
        }
    }
}

impl Gatekeeper {
    pub fn new(settings: PolicySettings) -> Self {
        Self {
            settings: Arc::new(settings),
            counts: Arc::default(),
        }
    }

    pub fn ae_title(&self) -> &str {
        &self.settings.ae_title
    }

    /// Decides on an association request from `calling` at `addr` addressed to `called`.
    pub fn admit(&self, calling: &str, called: &str, addr: IpAddr) -> Result<Permit, Refusal> {
        self.admit_as(calling, called, addr, None)
    }

    /// [`Gatekeeper::admit`] for a peer that may have proved an identity: `cert_names` are
    /// the names of its verified TLS client certificate (`None`: plain TCP, or TLS without
    /// client certificates). Allow-list entries with a `tls_client_name` need it among them.
    pub fn admit_as(
        &self,
        calling: &str,
        called: &str,
        addr: IpAddr,
        cert_names: Option<&[String]>,
    ) -> Result<Permit, Refusal> {
        let calling = calling.trim();
        if called.trim() != self.settings.ae_title {
            return Err(Refusal::CalledAeTitle);
        }
        let addr = canonical(addr);
        let per_peer_limit = if self.settings.peers.is_empty() {
            self.settings.max_associations_per_peer
        } else {
            let peer = self
                .settings
                .peers
                .iter()
                .find(|p| {
                    p.ae_title == calling
                        && canonical(p.host) == addr
                        && p.tls_client_name
                            .as_ref()
                            .is_none_or(|name| cert_names.is_some_and(|names| names.contains(name)))
                })
                .ok_or(Refusal::CallingAeTitle)?;
            peer.max_associations
                .unwrap_or(self.settings.max_associations_per_peer)
        };
        let key = (calling.to_string(), addr);
        let mut c = lock(&self.counts);
        if c.total >= self.settings.max_associations {
            return Err(Refusal::GlobalLimit);
        }
        let mine = c.per_peer.get(&key).copied().unwrap_or(0);
        if mine >= per_peer_limit {
            return Err(Refusal::PeerLimit);
        }
        c.total += 1;
        c.per_peer.insert(key.clone(), mine + 1);
        drop(c);
        Ok(Permit {
            key,
            counts: Arc::clone(&self.counts),
        })
    }

    /// Live associations.
    pub fn active(&self) -> u32 {
        lock(&self.counts).total
    }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they carry.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

fn lock(m: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    // Counters stay meaningful even if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn keeper(peers: Vec<Peer>, total: u32, per_peer: u32) -> Gatekeeper {
        Gatekeeper::new(PolicySettings {
            ae_title: "GATEWAY".into(),
            max_associations: total,
            max_associations_per_peer: per_peer,
            peers,
        })
    }

    #[test]
    fn wrong_called_ae_title_is_refused_with_reason_7() {
        let g = keeper(vec![], 4, 4);
        let r = g.admit("CT01", "OTHER", ip("127.0.0.1")).unwrap_err();
        assert_eq!(r, Refusal::CalledAeTitle);
        assert_eq!(
            r.pdu().source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized
            )
        );
    }

    #[test]
    fn allow_list_needs_both_ae_title_and_address() {
        let g = keeper(
            vec![Peer {
                ae_title: "CT01".into(),
                host: ip("10.0.0.5"),
                max_associations: None,
                tls_client_name: None,
            }],
            4,
            4,
        );
        assert!(g.admit("CT01", "GATEWAY", ip("10.0.0.5")).is_ok());
        assert!(g.admit("CT01", "GATEWAY", ip("::ffff:10.0.0.5")).is_ok());
        assert_eq!(
            g.admit("CT01", "GATEWAY", ip("10.0.0.6")).unwrap_err(),
            Refusal::CallingAeTitle
        );
        assert_eq!(
            g.admit("EVIL", "GATEWAY", ip("10.0.0.5")).unwrap_err(),
            Refusal::CallingAeTitle
        );
    }

    #[test]
    fn a_certificate_name_entry_needs_that_name_on_a_verified_certificate() {
        let g = keeper(
            vec![Peer {
                ae_title: "CT01".into(),
                host: ip("10.0.0.5"),
                max_associations: None,
                tls_client_name: Some("ct01.clinic".into()),
            }],
            4,
            4,
        );
        let at = ip("10.0.0.5");
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            g.admit_as(
                "CT01",
                "GATEWAY",
                at,
                Some(&names(&["ct01.clinic", "CT01"]))
            )
            .is_ok()
        );
        for refused in [
            g.admit("CT01", "GATEWAY", at),
            g.admit_as("CT01", "GATEWAY", at, None),
            g.admit_as("CT01", "GATEWAY", at, Some(&names(&["mr01.clinic"]))),
            g.admit_as(
                "CT01",
                "GATEWAY",
                ip("10.0.0.6"),
                Some(&names(&["ct01.clinic"])),
            ),
        ] {
            assert_eq!(refused.unwrap_err(), Refusal::CallingAeTitle);
        }
    }

    #[test]
    fn global_limit_then_slot_freed_on_drop() {
        let g = keeper(vec![], 2, 2);
        let a = g.admit("A", "GATEWAY", ip("127.0.0.1")).unwrap();
        let _b = g.admit("B", "GATEWAY", ip("127.0.0.1")).unwrap();
        let r = g.admit("C", "GATEWAY", ip("127.0.0.1")).unwrap_err();
        assert_eq!(r, Refusal::GlobalLimit);
        assert_eq!(
            r.pdu().source,
            AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded
            )
        );
        drop(a);
        assert!(g.admit("C", "GATEWAY", ip("127.0.0.1")).is_ok());
    }

    #[test]
    fn per_peer_limit_counts_ae_title_and_address_together() {
        let g = keeper(vec![], 8, 1);
        let _a = g.admit("CT01", "GATEWAY", ip("127.0.0.1")).unwrap();
        assert_eq!(
            g.admit("CT01", "GATEWAY", ip("127.0.0.1")).unwrap_err(),
            Refusal::PeerLimit
        );
        assert!(g.admit("CT02", "GATEWAY", ip("127.0.0.1")).is_ok());
        assert!(g.admit("CT01", "GATEWAY", ip("127.0.0.2")).is_ok());
    }

    #[test]
    fn peer_specific_limit_overrides_default() {
        let g = keeper(
            vec![Peer {
                ae_title: "CT01".into(),
                host: ip("127.0.0.1"),
                max_associations: Some(2),
                tls_client_name: None,
            }],
            8,
            1,
        );
        let _a = g.admit("CT01", "GATEWAY", ip("127.0.0.1")).unwrap();
        let _b = g.admit("CT01", "GATEWAY", ip("127.0.0.1")).unwrap();
        assert_eq!(
            g.admit("CT01", "GATEWAY", ip("127.0.0.1")).unwrap_err(),
            Refusal::PeerLimit
        );
        assert_eq!(g.active(), 2);
    }
}
