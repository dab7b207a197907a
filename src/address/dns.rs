//! Deliverability of an email domain: can mail to `someone@domain` be delivered at all?
//!
//! Owns the DNS side of address validation: the resolver (hickory) and its cache, the
//! verdict rules, the bound on concurrent checks, the per-check deadline and the DNS
//! metrics. It does not parse or normalize addresses (the caller passes the IDNA ASCII form
//! of an already validated domain) and it does not apply `on_failure`: an `Unknown` verdict
//! is returned as such and [`Deliverability::is_acceptable`] turns it into a decision.
//!
//! # Rules
//!
//! The rules match Python's `email-validator` 2.4.0 (`deliverability.py`), which follows
//! RFC 5321 §5.1 (implicit MX) and RFC 7505 (null MX):
//!
//! ```text
//! MX  ── records ──┬─ only null MX (exchange ".") ─────────────────▶ Undeliverable(NullMx)
//!  │               └─ some real MX (null MX mixed in are dropped) ──▶ Deliverable { mx, implicit: false }
//!  ├─ NXDOMAIN ────────────────────────────────────────────────────▶ Undeliverable(NoSuchDomain)
//!  ├─ NODATA ─▶ A ‖ AAAA ‖ TXT (concurrently)
//!  │            ├─ a globally reachable A or AAAA ─┬─ TXT is exactly "v=spf1 -all" ▶ Undeliverable(SpfRejectsAll)
//!  │            │                                  └─ otherwise ───────────────────▶ Deliverable { implicit: true }
//!  │            ├─ none, and a lookup failed ─────────────────────────────────────▶ Unknown
//!  │            └─ none (NODATA or only private/loopback/... addresses) ──────────▶ Undeliverable(NoMailServers)
//!  └─ SERVFAIL / REFUSED / timeout / transport error ──────────────▶ Unknown
//! ```
//!
//! # Invariants
//!
//! - A check never takes longer than `deadline_ms`, including the wait for a concurrency
//!   slot; past it the verdict is `Unknown`.
//! - At most `max_concurrent` checks talk to DNS at once (a tokio `Semaphore`).
//! - Every failed lookup is classified in one place, `classify`; nothing matches on
//!   error strings.
//! - Only definite DNS answers are cached (hickory's response cache: positive answers for
//!   their TTL, NXDOMAIN/NODATA for the SOA negative TTL capped at `negative_ttl_seconds`).
//!   Failures and timeouts are never cached, so a flaky name server cannot pin a domain to
//!   `Unknown`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::rdata::MX;
use hickory_resolver::proto::rr::{Name, RData};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

/// Default per-try timeout of one DNS query, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 2000;
/// Default number of tries of one DNS query (1 = no retry).
pub const DEFAULT_ATTEMPTS: usize = 1;
/// Default deadline of one whole check (all its lookups), in milliseconds. Two rounds of
/// lookups (MX, then A/AAAA/TXT) at the default per-try timeout fit in it.
pub const DEFAULT_DEADLINE_MS: u64 = 4000;
/// Default bound on checks running at the same time.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;
/// Default size of the resolver's response cache, in DNS responses.
pub const DEFAULT_CACHE_SIZE: usize = 4096;
/// Default cap on how long NXDOMAIN/NODATA answers are cached, in seconds.
pub const DEFAULT_NEGATIVE_TTL_SECONDS: u64 = 300;
/// The port a name server given as a bare IP address is reached on.
pub const DNS_PORT: u16 = 53;

/// The SPF record that says a domain sends no mail at all. `email-validator` compares the
/// whole TXT record (its strings joined) byte for byte, and so do we.
const SPF_REJECT_ALL: &[u8] = b"v=spf1 -all";

/// Histogram buckets of a whole check, in seconds: from a cache hit to the default deadline.
const CHECK_DURATION_BUCKETS: [f64; 11] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0,
];

/// The `outcome` label values, one per [`Deliverability`] variant.
const OUTCOME_LABELS: [&str; 3] = [OUTCOME_DELIVERABLE, OUTCOME_UNDELIVERABLE, OUTCOME_UNKNOWN];
const OUTCOME_DELIVERABLE: &str = "deliverable";
const OUTCOME_UNDELIVERABLE: &str = "undeliverable";
const OUTCOME_UNKNOWN: &str = "unknown";

/// Construction errors of a [`DomainChecker`]. Checks themselves never fail: DNS trouble is
/// a [`Deliverability::Unknown`] verdict.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An entry of `dns.nameservers` is neither an IP address nor `IP:port`.
    #[error(
        "dns.nameservers: {value:?} is not an IP address or IP:port \
         (write \"127.0.0.1\", \"127.0.0.1:5353\" or \"[::1]:5353\")"
    )]
    InvalidNameserver {
        /// The entry as configured.
        value: String,
        /// Why it did not parse as an IP address.
        #[source]
        source: std::net::AddrParseError,
    },
    /// A setting that must be at least 1 is 0.
    #[error("dns.{key} is 0; it must be at least 1")]
    Zero {
        /// The configuration key, without the `dns.` prefix.
        key: &'static str,
    },
    /// `dns.nameservers` is empty and the system resolver configuration could not be read.
    #[error(
        "dns.nameservers is empty and the system DNS configuration (/etc/resolv.conf) \
         could not be read; check that file or list name servers in dns.nameservers"
    )]
    SystemConfig(#[source] NetError),
    /// hickory refused the resolver configuration.
    #[error("could not build the DNS resolver; check the [dns] settings")]
    Resolver(#[source] NetError),
}

/// Result of this module's fallible functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to do with an address whose domain could not be checked (SERVFAIL, timeout, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Let the address through: a DNS outage must not block sign-ups. The default.
    #[default]
    Accept,
    /// Refuse the address: only domains proven deliverable pass.
    Reject,
}

/// The `[dns]` configuration section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Check the domain's mail servers when a verification is created (422
    /// `undeliverable_domain` when DNS says it cannot receive mail). Default true.
    pub check_on_create: bool,
    /// Name servers to ask, each `"IP"` (port 53) or `"IP:port"` (`"[v6]:port"` for IPv6).
    /// Empty (the default) uses the system configuration (`/etc/resolv.conf`).
    pub nameservers: Vec<String>,
    /// Timeout of one try of one query, in milliseconds. Default 2000.
    pub timeout_ms: u64,
    /// Total tries of one query (1 = no retry), at least 1. Default 1. A retry happens only
    /// after a timeout, SERVFAIL or transport error, never after a definite answer.
    pub attempts: usize,
    /// Deadline of one whole check (every lookup it makes, and the wait for a free
    /// concurrency slot), in milliseconds. Past it the verdict is `unknown`. Default 4000.
    pub deadline_ms: u64,
    /// Checks allowed to run at the same time; more wait for a slot. Default 64.
    pub max_concurrent: usize,
    /// Size of the resolver's cache, in DNS responses; 0 turns caching off. Default 4096.
    pub cache_size: usize,
    /// Longest time an NXDOMAIN or NODATA answer is cached, in seconds; the zone's SOA
    /// decides below that. 0 turns negative caching off. Default 300.
    pub negative_ttl_seconds: u64,
    /// What an `unknown` verdict means for the address: `"accept"` (default) or `"reject"`.
    pub on_failure: OnFailure,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            check_on_create: true,
            nameservers: Vec::new(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            attempts: DEFAULT_ATTEMPTS,
            deadline_ms: DEFAULT_DEADLINE_MS,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            cache_size: DEFAULT_CACHE_SIZE,
            negative_ttl_seconds: DEFAULT_NEGATIVE_TTL_SECONDS,
            on_failure: OnFailure::Accept,
        }
    }
}

/// The verdict on one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deliverability {
    /// The domain has somewhere to deliver mail to.
    Deliverable {
        /// Mail exchangers as `"<preference> <host>"` (no trailing dot), most preferred
        /// first. For an implicit MX this is `["0 <domain>"]`.
        mx: Vec<String>,
        /// True when there is no MX record and the domain's own A/AAAA address is used
        /// (RFC 5321 §5.1).
        implicit: bool,
    },
    /// DNS says mail to this domain cannot be delivered.
    Undeliverable {
        /// Why not.
        reason: UndeliverableReason,
    },
    /// DNS could not answer (SERVFAIL, REFUSED, timeout, unreachable name server, deadline).
    /// The caller applies [`DnsConfig::on_failure`].
    Unknown {
        /// What went wrong, for logs and operators; not a stable identifier.
        reason: String,
    },
}

impl Deliverability {
    /// Whether an address with this verdict passes, given the `on_failure` policy:
    /// deliverable always does, undeliverable never does, unknown follows the policy.
    pub fn is_acceptable(&self, on_failure: OnFailure) -> bool {
        match self {
            Deliverability::Deliverable { .. } => true,
            Deliverability::Undeliverable { .. } => false,
            Deliverability::Unknown { .. } => on_failure == OnFailure::Accept,
        }
    }

    /// The `outcome` metric label of this verdict.
    fn outcome_label(&self) -> &'static str {
        match self {
            Deliverability::Deliverable { .. } => OUTCOME_DELIVERABLE,
            Deliverability::Undeliverable { .. } => OUTCOME_UNDELIVERABLE,
            Deliverability::Unknown { .. } => OUTCOME_UNKNOWN,
        }
    }
}

/// Why a domain cannot receive mail. `Display` gives a sentence for the person who typed
/// the address; [`UndeliverableReason::code`] a stable identifier for APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UndeliverableReason {
    /// NXDOMAIN: the name does not exist in DNS.
    NoSuchDomain,
    /// The only MX record is the null MX `0 .` (RFC 7505): the domain declares it takes no mail.
    NullMx,
    /// No MX record and no globally reachable A/AAAA address to fall back to.
    NoMailServers,
    /// No MX record, and the SPF record `v=spf1 -all` says the domain sends no mail either:
    /// the name is not used for email.
    SpfRejectsAll,
}

impl UndeliverableReason {
    /// A stable snake_case identifier, for API responses and logs.
    pub fn code(self) -> &'static str {
        match self {
            UndeliverableReason::NoSuchDomain => "no_such_domain",
            UndeliverableReason::NullMx => "null_mx",
            UndeliverableReason::NoMailServers => "no_mail_servers",
            UndeliverableReason::SpfRejectsAll => "spf_rejects_all",
        }
    }
}

impl fmt::Display for UndeliverableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UndeliverableReason::NoSuchDomain => "The domain name does not exist.",
            UndeliverableReason::NullMx => "The domain name does not accept email.",
            UndeliverableReason::NoMailServers => {
                "The domain name does not accept email: it has no mail server."
            }
            UndeliverableReason::SpfRejectsAll => "The domain name does not send or receive email.",
        })
    }
}

/// Prometheus metrics of the deliverability checks. Cloning shares the same series.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    /// `verigate_dns_lookup_duration_seconds{outcome}`: time of one whole check, from the
    /// call to the verdict, cache hits and deadline expiries included.
    lookup_duration: HistogramVec,
    /// `verigate_dns_checks_total{outcome}`: checks by verdict.
    outcomes: IntCounterVec,
}

impl DnsMetrics {
    /// Creates the metrics and registers them in `registry`, with every `outcome` series
    /// (`deliverable`, `undeliverable`, `unknown`) present at zero. The registry adds the
    /// `verigate_` prefix.
    ///
    /// # Errors
    ///
    /// Fails when a metric of the same name is already registered (call this once per
    /// registry) or when prometheus rejects a definition.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let lookup_duration = HistogramVec::new(
            HistogramOpts::new(
                "dns_lookup_duration_seconds",
                "Time of one domain deliverability check (all its DNS lookups), by outcome",
            )
            .buckets(CHECK_DURATION_BUCKETS.to_vec()),
            &["outcome"],
        )?;
        let outcomes = IntCounterVec::new(
            Opts::new(
                "dns_checks_total",
                "Domain deliverability checks, by outcome",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(lookup_duration.clone()))?;
        registry.register(Box::new(outcomes.clone()))?;
        for outcome in OUTCOME_LABELS {
            // Touching a labelled child creates its series at zero.
            lookup_duration.with_label_values(&[outcome]);
            outcomes.with_label_values(&[outcome]);
        }
        Ok(DnsMetrics {
            lookup_duration,
            outcomes,
        })
    }

    fn observe(&self, verdict: &Deliverability, took: Duration) {
        let outcome = [verdict.outcome_label()];
        self.lookup_duration
            .with_label_values(&outcome)
            .observe(took.as_secs_f64());
        self.outcomes.with_label_values(&outcome).inc();
    }
}

/// Checks whether domains can receive mail. Cheap to clone: clones share the resolver, its
/// cache, the concurrency bound and the metrics.
#[derive(Clone)]
pub struct DomainChecker {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: TokioResolver,
    slots: Semaphore,
    deadline: Duration,
    metrics: DnsMetrics,
}

impl fmt::Debug for DomainChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainChecker")
            .field("deadline", &self.inner.deadline)
            .field("free_slots", &self.inner.slots.available_permits())
            .finish_non_exhaustive()
    }
}

impl DomainChecker {
    /// Builds the checker and its resolver. No query is sent here.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidNameserver`] for a bad `nameservers` entry, [`Error::Zero`] when
    /// `timeout_ms`, `attempts`, `deadline_ms` or `max_concurrent` is 0,
    /// [`Error::SystemConfig`] when `nameservers` is empty and the system configuration cannot
    /// be read, [`Error::Resolver`] when hickory rejects the configuration.
    pub fn new(cfg: &DnsConfig, metrics: DnsMetrics) -> Result<Self> {
        for (key, value) in [
            ("timeout_ms", cfg.timeout_ms),
            ("deadline_ms", cfg.deadline_ms),
            ("attempts", cfg.attempts as u64),
            ("max_concurrent", cfg.max_concurrent as u64),
        ] {
            if value == 0 {
                return Err(Error::Zero { key });
            }
        }
        let nameservers = cfg
            .nameservers
            .iter()
            .map(|value| parse_nameserver(value))
            .collect::<Result<Vec<_>>>()?;

        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(Error::SystemConfig)?
        } else {
            let servers = nameservers
                .into_iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], servers),
                TokioRuntimeProvider::default(),
            )
        };
        // Only what this module depends on is overridden; with the system configuration the
        // rest (edns0, rotate, ...) stays as resolv.conf says.
        let opts = builder.options_mut();
        opts.timeout = Duration::from_millis(cfg.timeout_ms);
        // hickory counts retries: its total tries are `attempts + 1`.
        opts.attempts = cfg.attempts - 1;
        opts.cache_size = cfg.cache_size as u64;
        // Deliverability is a DNS question; /etc/hosts has no MX records and must not
        // make a domain look deliverable through an A entry.
        opts.use_hosts_file = ResolveHosts::Never;
        // negative_min_ttl stays 0: an NXDOMAIN/NODATA without SOA is not cached
        // (RFC 2308 §5); with an SOA its negative TTL is used, capped here.
        opts.negative_max_ttl = Some(Duration::from_secs(cfg.negative_ttl_seconds));
        let resolver = builder.build().map_err(Error::Resolver)?;

        Ok(DomainChecker {
            inner: Arc::new(Inner {
                resolver,
                slots: Semaphore::new(cfg.max_concurrent),
                deadline: Duration::from_millis(cfg.deadline_ms),
                metrics,
            }),
        })
    }

    /// Decides whether `ascii_domain` can receive mail (see the module docs for the rules).
    ///
    /// `ascii_domain` is the IDNA ASCII form of an already validated domain, without a
    /// trailing dot; the checker queries it as a fully qualified name, so no search list
    /// applies. A string that cannot be a DNS name is `Undeliverable(NoSuchDomain)`.
    /// Never takes longer than the configured deadline.
    pub async fn check(&self, ascii_domain: &str) -> Deliverability {
        let started = Instant::now();
        let deadline = self.inner.deadline;
        let verdict = match tokio::time::timeout(deadline, self.check_in_slot(ascii_domain)).await {
            Ok(verdict) => verdict,
            Err(_elapsed) => Deliverability::Unknown {
                reason: format!(
                    "timed out: the DNS checks took over {} ms",
                    deadline.as_millis()
                ),
            },
        };
        self.inner.metrics.observe(&verdict, started.elapsed());
        verdict
    }

    async fn check_in_slot(&self, ascii_domain: &str) -> Deliverability {
        let Some(name) = fqdn(ascii_domain) else {
            return Deliverability::Undeliverable {
                reason: UndeliverableReason::NoSuchDomain,
            };
        };
        // The semaphore is never closed, so this only fails if that changes.
        let Ok(_slot) = self.inner.slots.acquire().await else {
            return Deliverability::Unknown {
                reason: "the DNS checker is shutting down".into(),
            };
        };
        let domain = ascii_domain.strip_suffix('.').unwrap_or(ascii_domain);
        let resolver = &self.inner.resolver;
        match resolver.mx_lookup(name.clone()).await {
            Ok(lookup) => match mx_verdict(&lookup) {
                Some(verdict) => verdict,
                // An answer without MX records (e.g. only a CNAME) is NODATA for MX.
                None => self.implicit_mx(name, domain).await,
            },
            Err(error) => match classify(&error) {
                LookupError::NxDomain => Deliverability::Undeliverable {
                    reason: UndeliverableReason::NoSuchDomain,
                },
                LookupError::NoData => self.implicit_mx(name, domain).await,
                LookupError::Failed(failure) => Deliverability::Unknown {
                    reason: format!("MX lookup: {failure}"),
                },
            },
        }
    }

    /// No MX record: fall back to the domain's own address (RFC 5321 §5.1), unless its SPF
    /// record says it does no email at all. TXT is fetched together with A and AAAA so that
    /// the fallback costs one round trip; its answer only matters if an address is found.
    async fn implicit_mx(&self, name: Name, domain: &str) -> Deliverability {
        let resolver = &self.inner.resolver;
        let (a, aaaa, txt) = tokio::join!(
            resolver.ipv4_lookup(name.clone()),
            resolver.ipv6_lookup(name.clone()),
            resolver.txt_lookup(name),
        );
        match combine_addresses(address_outcome(a, "A"), address_outcome(aaaa, "AAAA")) {
            AddressOutcome::Global => {}
            AddressOutcome::NoneGlobal => {
                return Deliverability::Undeliverable {
                    reason: UndeliverableReason::NoMailServers,
                };
            }
            AddressOutcome::NxDomain => {
                return Deliverability::Undeliverable {
                    reason: UndeliverableReason::NoSuchDomain,
                };
            }
            AddressOutcome::Failed(reason) => return Deliverability::Unknown { reason },
        }
        let implicit = Deliverability::Deliverable {
            mx: vec![format!("0 {domain}")],
            implicit: true,
        };
        match txt {
            Ok(lookup) if spf_rejects_all(&lookup) => Deliverability::Undeliverable {
                reason: UndeliverableReason::SpfRejectsAll,
            },
            Ok(_) => implicit,
            Err(error) => match classify(&error) {
                LookupError::NoData => implicit,
                LookupError::NxDomain => Deliverability::Undeliverable {
                    reason: UndeliverableReason::NoSuchDomain,
                },
                // email-validator reports unknown deliverability here too: without the SPF
                // record we cannot tell whether the domain opted out of email.
                LookupError::Failed(failure) => Deliverability::Unknown {
                    reason: format!("TXT lookup: {failure}"),
                },
            },
        }
    }
}

/// `ascii_domain` as a fully qualified name, or `None` when it cannot be a DNS name.
fn fqdn(ascii_domain: &str) -> Option<Name> {
    let domain = ascii_domain.strip_suffix('.').unwrap_or(ascii_domain);
    // `Name::from_ascii` reads `\` escapes; no validated domain contains a backslash.
    if domain.is_empty() || domain.contains('\\') {
        return None;
    }
    Name::from_ascii(format!("{domain}.")).ok()
}

/// Parses a `nameservers` entry: `IP:port`, `[v6]:port`, or a bare IP meaning port 53.
fn parse_nameserver(value: &str) -> Result<SocketAddr> {
    let value = value.trim();
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    value
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DNS_PORT))
        .map_err(|source| Error::InvalidNameserver {
            value: value.to_owned(),
            source,
        })
}

/// The verdict from an MX answer, or `None` when it holds no MX record at all.
/// Null MX records (exchange ".") are dropped, as email-validator does; only when nothing
/// else is left is the domain a null-MX domain.
fn mx_verdict(lookup: &Lookup) -> Option<Deliverability> {
    let records: Vec<&MX> = lookup
        .answers()
        .iter()
        .filter_map(|record| match &record.data {
            RData::MX(mx) => Some(mx),
            _ => None,
        })
        .collect();
    if records.is_empty() {
        return None;
    }
    let mut hosts: Vec<(u16, String)> = records
        .into_iter()
        .filter(|mx| !mx.exchange.is_root())
        .map(|mx| {
            let host = mx.exchange.to_ascii();
            let host = host.strip_suffix('.').map(str::to_owned).unwrap_or(host);
            (mx.preference, host)
        })
        .collect();
    if hosts.is_empty() {
        return Some(Deliverability::Undeliverable {
            reason: UndeliverableReason::NullMx,
        });
    }
    // Preference first, then name, as email-validator sorts its (preference, host) tuples.
    hosts.sort();
    Some(Deliverability::Deliverable {
        mx: hosts
            .into_iter()
            .map(|(preference, host)| format!("{preference} {host}"))
            .collect(),
        implicit: false,
    })
}

/// True when one TXT record of the answer is exactly `v=spf1 -all`.
fn spf_rejects_all(lookup: &Lookup) -> bool {
    lookup.answers().iter().any(|record| match &record.data {
        RData::TXT(txt) => txt.txt_data.concat() == SPF_REJECT_ALL,
        _ => false,
    })
}

/// What an A or AAAA lookup says about an implicit MX.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AddressOutcome {
    /// At least one globally reachable address.
    Global,
    /// NODATA, or only addresses that are not globally reachable.
    NoneGlobal,
    /// The name does not exist.
    NxDomain,
    /// The lookup failed; the reason is for [`Deliverability::Unknown`].
    Failed(String),
}

fn address_outcome(result: Result<Lookup, NetError>, record_type: &str) -> AddressOutcome {
    match result {
        Ok(lookup) => {
            let global = lookup.answers().iter().any(|record| match &record.data {
                RData::A(a) => is_globally_reachable(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => is_globally_reachable(IpAddr::V6(aaaa.0)),
                _ => false,
            });
            if global {
                AddressOutcome::Global
            } else {
                AddressOutcome::NoneGlobal
            }
        }
        Err(error) => match classify(&error) {
            LookupError::NxDomain => AddressOutcome::NxDomain,
            LookupError::NoData => AddressOutcome::NoneGlobal,
            LookupError::Failed(failure) => {
                AddressOutcome::Failed(format!("{record_type} lookup: {failure}"))
            }
        },
    }
}

/// Combines the A and AAAA outcomes: any usable address wins; otherwise a failure means we
/// cannot conclude; otherwise NXDOMAIN (the name vanished since the MX query) beats NODATA.
/// email-validator asks A first and gives up on an A failure even when AAAA would answer;
/// asking both at once and letting either address win is stricter about "unknown".
fn combine_addresses(a: AddressOutcome, aaaa: AddressOutcome) -> AddressOutcome {
    use AddressOutcome::{Failed, Global, NoneGlobal, NxDomain};
    match (a, aaaa) {
        (Global, _) | (_, Global) => Global,
        (Failed(reason), _) | (_, Failed(reason)) => Failed(reason),
        (NxDomain, _) | (_, NxDomain) => NxDomain,
        (NoneGlobal, NoneGlobal) => NoneGlobal,
    }
}

/// How one lookup failed, as far as the verdict is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LookupError {
    /// NXDOMAIN: the name does not exist.
    NxDomain,
    /// NOERROR with no record of the asked type.
    NoData,
    /// No usable answer; the verdict is unknown.
    Failed(Failure),
}

/// Why a lookup produced no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// No answer within the per-try timeout, on every try.
    Timeout,
    /// The server answered SERVFAIL.
    ServFail,
    /// The server answered REFUSED.
    Refused,
    /// The server answered another error code (FORMERR, NOTIMP, ...).
    ResponseCode(ResponseCode),
    /// The name server could not be reached (connection refused, reset, no route, ...).
    Transport,
    /// Too many queries in flight on the connection to the name server.
    Busy,
    /// Anything else hickory reports (malformed or mismatched answers, future variants).
    /// Holds hickory's description, for the operator.
    Other(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout => f.write_str("the name server did not answer in time"),
            Failure::ServFail => f.write_str("the name server failed (SERVFAIL)"),
            Failure::Refused => f.write_str("the name server refused the query (REFUSED)"),
            Failure::ResponseCode(code) => {
                write!(f, "the name server answered with error {code}")
            }
            Failure::Transport => f.write_str("the name server could not be reached"),
            Failure::Busy => f.write_str("too many DNS queries in flight"),
            Failure::Other(description) => write!(f, "the lookup failed: {description}"),
        }
    }
}

/// The one place where hickory errors are interpreted.
fn classify(error: &NetError) -> LookupError {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code: ResponseCode::NXDomain,
            ..
        })) => LookupError::NxDomain,
        // hickory builds `NoRecordsFound` only for NXDOMAIN (above) and NOERROR-without-answer.
        NetError::Dns(DnsError::NoRecordsFound(_)) => LookupError::NoData,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => {
            LookupError::Failed(Failure::ServFail)
        }
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => {
            LookupError::Failed(Failure::Refused)
        }
        NetError::Dns(DnsError::ResponseCode(code)) => {
            LookupError::Failed(Failure::ResponseCode(*code))
        }
        NetError::Timeout => LookupError::Failed(Failure::Timeout),
        NetError::Io(_) | NetError::NoConnections => LookupError::Failed(Failure::Transport),
        NetError::Busy => LookupError::Failed(Failure::Busy),
        NetError::Proto(_)
        | NetError::Truncated
        | NetError::QueryCaseMismatch
        | NetError::ForeignClassRecord { .. }
        | NetError::Message(_)
        | NetError::Msg(_)
        | NetError::ParseInt(_) => LookupError::Failed(Failure::Other(error.to_string())),
        // `NetError` and `DnsError` are #[non_exhaustive] and grow variants with hickory's
        // features (DNSSEC, HTTPS, QUIC, which another crate may switch on). None of them
        // is a definite "no such domain / no such record", so unknown is the safe verdict.
        _ => LookupError::Failed(Failure::Other(error.to_string())),
    }
}

/// Whether `ip` is globally reachable, as Python's `ipaddress` `is_global` (3.13, after the
/// CVE-2024-4032 fix) decides it from the IANA special-purpose address registries. An
/// implicit MX on a private, loopback or documentation address cannot receive mail from
/// the Internet, so email-validator ignores it, and so do we.
fn is_globally_reachable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_global_v4(v4),
            None => {
                let bits = u128::from(v6);
                let in_list = |list: &[(Ipv6Addr, u32)]| {
                    list.iter()
                        .any(|&(net, len)| prefix_match_128(bits, u128::from(net), len))
                };
                !in_list(&V6_NOT_GLOBAL) || in_list(&V6_GLOBAL_EXCEPTIONS)
            }
        },
    }
}

fn is_global_v4(v4: Ipv4Addr) -> bool {
    let bits = u32::from(v4);
    let in_list = |list: &[(Ipv4Addr, u32)]| {
        list.iter()
            .any(|&(net, len)| prefix_match_32(bits, u32::from(net), len))
    };
    // 100.64.0.0/10 (shared address space) is neither private nor global in Python.
    let shared = prefix_match_32(bits, u32::from(V4_SHARED.0), V4_SHARED.1);
    !shared && (!in_list(&V4_NOT_GLOBAL) || in_list(&V4_GLOBAL_EXCEPTIONS))
}

fn prefix_match_32(addr: u32, net: u32, len: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    addr & mask == net & mask
}

fn prefix_match_128(addr: u128, net: u128, len: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    addr & mask == net & mask
}

/// IPv4 shared address space (RFC 6598).
const V4_SHARED: (Ipv4Addr, u32) = (Ipv4Addr::new(100, 64, 0, 0), 10);

/// IPv4 blocks that are not globally reachable (Python's `_IPv4Constants._private_networks`).
const V4_NOT_GLOBAL: [(Ipv4Addr, u32); 14] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 0, 0, 170), 31),
    (Ipv4Addr::new(192, 0, 2, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(198, 51, 100, 0), 24),
    (Ipv4Addr::new(203, 0, 113, 0), 24),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
    (Ipv4Addr::new(255, 255, 255, 255), 32),
];

/// Globally reachable holes in [`V4_NOT_GLOBAL`] (PCP and NAT traversal anycast).
const V4_GLOBAL_EXCEPTIONS: [(Ipv4Addr, u32); 2] = [
    (Ipv4Addr::new(192, 0, 0, 9), 32),
    (Ipv4Addr::new(192, 0, 0, 10), 32),
];

/// IPv6 blocks that are not globally reachable (Python's `_IPv6Constants._private_networks`).
const V6_NOT_GLOBAL: [(Ipv6Addr, u32); 11] = [
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1), 128),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 128),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48),
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23),
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32),
    (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16),
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
];

/// Globally reachable holes in [`V6_NOT_GLOBAL`] (inside 2001::/23).
const V6_GLOBAL_EXCEPTIONS: [(Ipv6Addr, u32); 6] = [
    (Ipv6Addr::new(0x2001, 1, 0, 0, 0, 0, 0, 1), 128),
    (Ipv6Addr::new(0x2001, 1, 0, 0, 0, 0, 0, 2), 128),
    (Ipv6Addr::new(0x2001, 3, 0, 0, 0, 0, 0, 0), 32),
    (Ipv6Addr::new(0x2001, 4, 0x112, 0, 0, 0, 0, 0), 48),
    (Ipv6Addr::new(0x2001, 0x20, 0, 0, 0, 0, 0, 0), 28),
    (Ipv6Addr::new(0x2001, 0x30, 0, 0, 0, 0, 0, 0), 28),
];

#[cfg(test)]
mod tests {
    use std::io;

    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::RecordType;

    use super::*;

    fn no_records(code: ResponseCode) -> NetError {
        let query = Query::query(Name::from_ascii("example.test.").unwrap(), RecordType::MX);
        NetError::from(DnsError::NoRecordsFound(NoRecords::new(query, code)))
    }

    #[test]
    fn classify_gives_each_hickory_error_one_outcome() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let cases = [
            (no_records(ResponseCode::NXDomain), LookupError::NxDomain),
            (no_records(ResponseCode::NoError), LookupError::NoData),
            (
                DnsError::ResponseCode(ResponseCode::ServFail).into(),
                LookupError::Failed(Failure::ServFail),
            ),
            (
                DnsError::ResponseCode(ResponseCode::Refused).into(),
                LookupError::Failed(Failure::Refused),
            ),
            (
                DnsError::ResponseCode(ResponseCode::FormErr).into(),
                LookupError::Failed(Failure::ResponseCode(ResponseCode::FormErr)),
            ),
            (NetError::Timeout, LookupError::Failed(Failure::Timeout)),
            (
                NetError::Io(Arc::new(refused)),
                LookupError::Failed(Failure::Transport),
            ),
            (
                NetError::NoConnections,
                LookupError::Failed(Failure::Transport),
            ),
            (NetError::Busy, LookupError::Failed(Failure::Busy)),
            (
                NetError::Msg("odd".into()),
                LookupError::Failed(Failure::Other("odd".into())),
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(classify(&error), expected, "{error:?}");
        }
    }

    #[test]
    fn global_reachability_matches_python_ipaddress() {
        // Expected values are Python 3.13's `ipaddress.ip_address(a).is_global`.
        let cases = [
            ("1.1.1.1", true),
            ("8.8.8.8", true),
            ("224.0.0.1", true), // multicast is not in the "not global" registry
            ("0.1.2.3", false),
            ("10.1.2.3", false),
            ("100.64.0.1", false), // shared address space
            ("127.0.0.1", false),
            ("169.254.1.1", false),
            ("172.16.0.1", false),
            ("172.32.0.1", true),
            ("192.0.0.1", false),
            ("192.0.0.9", true), // exception inside 192.0.0.0/24
            ("192.0.0.10", true),
            ("192.0.2.1", false),
            ("192.168.1.1", false),
            ("198.18.0.1", false),
            ("198.51.100.1", false),
            ("203.0.113.1", false),
            ("240.0.0.1", false),
            ("255.255.255.255", false),
            ("2606:4700:4700::1111", true),
            ("2001:4860:4860::8888", true),
            ("::1", false),
            ("::", false),
            ("::ffff:10.0.0.1", false), // IPv4-mapped: judged as the IPv4 address
            ("::ffff:1.1.1.1", true),
            ("64:ff9b::1.1.1.1", true),
            ("64:ff9b:1::1", false),
            ("100::1", false),
            ("2001::1", false),
            ("2001:1::1", true),
            ("2001:3::1", true),
            ("2001:4:112::1", true),
            ("2001:20::1", true),
            ("2001:db8::1", false),
            ("2002::1", false),
            ("3fff::1", false),
            ("fc00::1", false),
            ("fd00::1", false),
            ("fe80::1", false),
            ("ff02::1", true),
        ];
        for (text, expected) in cases {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(is_globally_reachable(ip), expected, "{text}");
        }
    }

    #[test]
    fn nameservers_are_ip_or_ip_and_port() {
        assert_eq!(
            parse_nameserver("127.0.0.1").unwrap(),
            "127.0.0.1:53".parse().unwrap()
        );
        assert_eq!(
            parse_nameserver("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_nameserver("::1").unwrap(),
            "[::1]:53".parse().unwrap()
        );
        assert_eq!(
            parse_nameserver("[::1]:5353").unwrap(),
            "[::1]:5353".parse().unwrap()
        );
        for bad in [
            "",
            "localhost",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "::1:5353x",
        ] {
            assert!(parse_nameserver(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_defaults_apply_to_missing_keys() {
        let cfg: DnsConfig = serde_json::from_str(r#"{"on_failure": "reject"}"#).unwrap();
        assert_eq!(
            cfg,
            DnsConfig {
                on_failure: OnFailure::Reject,
                ..DnsConfig::default()
            }
        );
        assert_eq!(cfg.timeout_ms, 2000);
        assert_eq!(cfg.attempts, 1);
        assert_eq!(cfg.deadline_ms, 4000);
        assert_eq!(cfg.max_concurrent, 64);
        assert_eq!(cfg.cache_size, 4096);
        assert_eq!(cfg.negative_ttl_seconds, 300);
    }

    #[test]
    fn config_rejects_an_unknown_key_by_name() {
        let error = serde_json::from_str::<DnsConfig>(r#"{"timeout": 5}"#).unwrap_err();
        assert!(error.to_string().contains("timeout"), "{error}");
    }

    #[test]
    fn on_failure_is_lowercase() {
        let cfg: DnsConfig = serde_json::from_str(r#"{"on_failure": "accept"}"#).unwrap();
        assert_eq!(cfg.on_failure, OnFailure::Accept);
        assert!(serde_json::from_str::<DnsConfig>(r#"{"on_failure": "Accept"}"#).is_err());
    }

    #[test]
    fn any_usable_address_wins_then_failures_then_nxdomain() {
        use AddressOutcome::{Failed, Global, NoneGlobal, NxDomain};
        let failed = || Failed("A lookup: timeout".into());
        assert_eq!(combine_addresses(failed(), Global), Global);
        assert_eq!(combine_addresses(NoneGlobal, Global), Global);
        assert_eq!(combine_addresses(NoneGlobal, failed()), failed());
        assert_eq!(combine_addresses(NxDomain, failed()), failed());
        assert_eq!(combine_addresses(NxDomain, NoneGlobal), NxDomain);
        assert_eq!(combine_addresses(NoneGlobal, NoneGlobal), NoneGlobal);
    }

    #[test]
    fn names_get_a_root_dot_and_invalid_names_are_refused() {
        assert_eq!(fqdn("example.com").unwrap().to_ascii(), "example.com.");
        assert_eq!(fqdn("example.com.").unwrap().to_ascii(), "example.com.");
        for bad in ["", ".", "a..b", "a\\.b", &"x".repeat(64)] {
            assert!(fqdn(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn undeliverable_reasons_read_as_sentences_with_stable_codes() {
        let reasons = [
            UndeliverableReason::NoSuchDomain,
            UndeliverableReason::NullMx,
            UndeliverableReason::NoMailServers,
            UndeliverableReason::SpfRejectsAll,
        ];
        for reason in reasons {
            let sentence = reason.to_string();
            assert!(sentence.starts_with("The domain name "), "{sentence}");
            assert!(sentence.ends_with('.'), "{sentence}");
            assert!(
                reason
                    .code()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_')
            );
        }
    }

    #[test]
    fn only_unknown_verdicts_depend_on_the_policy() {
        let deliverable = Deliverability::Deliverable {
            mx: vec![],
            implicit: false,
        };
        let undeliverable = Deliverability::Undeliverable {
            reason: UndeliverableReason::NullMx,
        };
        let unknown = Deliverability::Unknown {
            reason: "timed out".into(),
        };
        for policy in [OnFailure::Accept, OnFailure::Reject] {
            assert!(deliverable.is_acceptable(policy));
            assert!(!undeliverable.is_acceptable(policy));
        }
        assert!(unknown.is_acceptable(OnFailure::Accept));
        assert!(!unknown.is_acceptable(OnFailure::Reject));
    }
}
