//! Deliverability checks against an in-process authoritative server (`FakeDns`) and a
//! server that never answers (`SilentDns`). Nothing leaves 127.0.0.1.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use prometheus::{Registry, TextEncoder};
use verigate::address::dns::{
    Deliverability, DnsConfig, DnsMetrics, DomainChecker, Error, OnFailure, UndeliverableReason,
};

use crate::support::fake_dns::{FakeDns, FakeDnsBuilder, SilentDns};

/// A globally reachable IPv4 address (only served as zone data, never contacted).
const GLOBAL_V4: Ipv4Addr = Ipv4Addr::new(1, 1, 1, 1);
/// A globally reachable IPv6 address (only served as zone data, never contacted).
const GLOBAL_V6: Ipv6Addr = Ipv6Addr::new(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1111);
/// Per-try timeout for tests against `FakeDns`, which answers in microseconds.
const FAST_TIMEOUT_MS: u64 = 1000;
/// Slack for scheduling on a loaded 2-core machine when asserting an upper time bound.
const TIMING_MARGIN: Duration = Duration::from_millis(700);

/// The zone the tests share: one name per case.
fn example_zone() -> FakeDnsBuilder {
    FakeDns::builder("example.test")
        .mx("mx", 20, "mx2")
        .mx("mx", 10, "mx1")
        .a("mx1", GLOBAL_V4)
        .a("mx2", GLOBAL_V4)
        .mx("mixednull", 0, ".")
        .mx("mixednull", 10, "mx1")
        .mx("nullmx", 0, ".")
        .a("aonly", GLOBAL_V4)
        .aaaa("aaaaonly", GLOBAL_V6)
        .a("private", Ipv4Addr::LOCALHOST)
        .aaaa("private", Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1))
        .txt("spfreject", "v=spf1 -all")
        .a("aspfreject", GLOBAL_V4)
        .txt("aspfreject", "v=spf1 -all")
        .a("aspfother", GLOBAL_V4)
        .txt("aspfother", "v=spf1 ip4:1.1.1.1 -all")
        .servfail("broken")
}

fn config(nameserver: &str) -> DnsConfig {
    DnsConfig {
        nameservers: vec![nameserver.to_owned()],
        timeout_ms: FAST_TIMEOUT_MS,
        ..DnsConfig::default()
    }
}

fn checker(cfg: &DnsConfig) -> (DomainChecker, Registry) {
    let registry = Registry::new_custom(Some("verigate".into()), None).expect("registry");
    let metrics = DnsMetrics::register(&registry).expect("register DNS metrics");
    let checker = DomainChecker::new(cfg, metrics).expect("build checker");
    (checker, registry)
}

async fn check_in_example_zone(domain: &str) -> Deliverability {
    let dns = example_zone().start().await;
    let (checker, _registry) = checker(&config(&dns.nameserver()));
    let verdict = checker.check(domain).await;
    dns.stop().await;
    verdict
}

fn undeliverable(reason: UndeliverableReason) -> Deliverability {
    Deliverability::Undeliverable { reason }
}

fn unknown_reason(verdict: &Deliverability) -> &str {
    match verdict {
        Deliverability::Unknown { reason } => reason,
        other => panic!("expected an unknown verdict, got {other:?}"),
    }
}

fn metrics_text(registry: &Registry) -> String {
    TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode metrics")
}

#[tokio::test]
async fn mx_records_are_listed_by_preference() {
    assert_eq!(
        check_in_example_zone("mx.example.test").await,
        Deliverability::Deliverable {
            mx: vec!["10 mx1.example.test".into(), "20 mx2.example.test".into()],
            implicit: false,
        }
    );
}

#[tokio::test]
async fn a_null_mx_alone_means_the_domain_takes_no_mail() {
    assert_eq!(
        check_in_example_zone("nullmx.example.test").await,
        undeliverable(UndeliverableReason::NullMx)
    );
}

#[tokio::test]
async fn a_null_mx_next_to_real_mx_records_is_ignored() {
    assert_eq!(
        check_in_example_zone("mixednull.example.test").await,
        Deliverability::Deliverable {
            mx: vec!["10 mx1.example.test".into()],
            implicit: false,
        }
    );
}

#[tokio::test]
async fn an_a_record_without_mx_is_an_implicit_mx() {
    assert_eq!(
        check_in_example_zone("aonly.example.test").await,
        Deliverability::Deliverable {
            mx: vec!["0 aonly.example.test".into()],
            implicit: true,
        }
    );
}

#[tokio::test]
async fn an_aaaa_record_without_mx_is_an_implicit_mx() {
    assert_eq!(
        check_in_example_zone("aaaaonly.example.test").await,
        Deliverability::Deliverable {
            mx: vec!["0 aaaaonly.example.test".into()],
            implicit: true,
        }
    );
}

#[tokio::test]
async fn loopback_and_private_addresses_are_no_implicit_mx() {
    assert_eq!(
        check_in_example_zone("private.example.test").await,
        undeliverable(UndeliverableReason::NoMailServers)
    );
}

#[tokio::test]
async fn a_name_with_no_mx_and_no_address_has_no_mail_servers() {
    // Its "v=spf1 -all" is never reached: like email-validator, SPF is consulted only
    // when an address fallback exists.
    assert_eq!(
        check_in_example_zone("spfreject.example.test").await,
        undeliverable(UndeliverableReason::NoMailServers)
    );
}

#[tokio::test]
async fn an_address_without_mx_and_spf_reject_all_is_not_used_for_email() {
    assert_eq!(
        check_in_example_zone("aspfreject.example.test").await,
        undeliverable(UndeliverableReason::SpfRejectsAll)
    );
}

#[tokio::test]
async fn an_spf_policy_with_mechanisms_keeps_the_implicit_mx() {
    assert_eq!(
        check_in_example_zone("aspfother.example.test").await,
        Deliverability::Deliverable {
            mx: vec!["0 aspfother.example.test".into()],
            implicit: true,
        }
    );
}

#[tokio::test]
async fn a_name_that_does_not_exist_is_undeliverable() {
    assert_eq!(
        check_in_example_zone("nosuch.example.test").await,
        undeliverable(UndeliverableReason::NoSuchDomain)
    );
}

#[tokio::test]
async fn a_trailing_dot_is_accepted() {
    assert_eq!(
        check_in_example_zone("nullmx.example.test.").await,
        undeliverable(UndeliverableReason::NullMx)
    );
}

#[tokio::test]
async fn a_string_that_is_no_dns_name_does_not_exist_and_sends_no_query() {
    let dns = example_zone().start().await;
    let (checker, _registry) = checker(&config(&dns.nameserver()));
    for bad in [
        "",
        ".",
        "a..example.test",
        &format!("{}.test", "x".repeat(64)),
    ] {
        assert_eq!(
            checker.check(bad).await,
            undeliverable(UndeliverableReason::NoSuchDomain),
            "{bad:?}"
        );
    }
    assert_eq!(dns.queries(), 0);
    dns.stop().await;
}

#[tokio::test]
async fn servfail_is_unknown_and_follows_on_failure() {
    let verdict = check_in_example_zone("broken.example.test").await;
    assert!(unknown_reason(&verdict).contains("SERVFAIL"), "{verdict:?}");
    assert!(verdict.is_acceptable(OnFailure::Accept));
    assert!(!verdict.is_acceptable(OnFailure::Reject));
}

#[tokio::test]
async fn a_silent_name_server_gives_unknown_within_the_deadline() {
    let silent = SilentDns::start();
    let deadline = Duration::from_millis(300);
    let cfg = DnsConfig {
        nameservers: vec![silent.nameserver()],
        // Longer than the deadline, so only the deadline can end the check.
        timeout_ms: 5000,
        deadline_ms: deadline.as_millis() as u64,
        ..DnsConfig::default()
    };
    let (checker, registry) = checker(&cfg);

    let started = Instant::now();
    let verdict = checker.check("example.test").await;
    let took = started.elapsed();

    assert!(
        unknown_reason(&verdict).contains("timed out"),
        "{verdict:?}"
    );
    assert!(took >= deadline, "returned before the deadline: {took:?}");
    assert!(took < deadline + TIMING_MARGIN, "took {took:?}");
    assert!(metrics_text(&registry).contains(r#"verigate_dns_checks_total{outcome="unknown"} 1"#));
}

#[tokio::test]
async fn attempts_counts_every_try_of_a_query() {
    let silent = SilentDns::start();
    let timeout = Duration::from_millis(150);
    let attempts = 2;
    let cfg = DnsConfig {
        nameservers: vec![silent.nameserver()],
        timeout_ms: timeout.as_millis() as u64,
        attempts,
        deadline_ms: 10_000,
        ..DnsConfig::default()
    };
    let (checker, _registry) = checker(&cfg);

    let started = Instant::now();
    let verdict = checker.check("example.test").await;
    let took = started.elapsed();

    assert!(
        unknown_reason(&verdict).starts_with("MX lookup: the name server did not answer in time"),
        "{verdict:?}"
    );
    let all_tries = timeout * attempts as u32;
    assert!(took >= all_tries, "fewer tries than configured: {took:?}");
    assert!(
        took < all_tries + timeout + TIMING_MARGIN,
        "more tries than configured: {took:?}"
    );
}

#[tokio::test]
async fn max_concurrent_makes_further_checks_wait_for_a_slot() {
    let silent = SilentDns::start();
    let timeout = Duration::from_millis(200);
    let cfg = DnsConfig {
        nameservers: vec![silent.nameserver()],
        timeout_ms: timeout.as_millis() as u64,
        max_concurrent: 1,
        deadline_ms: 10_000,
        ..DnsConfig::default()
    };
    let (checker, _registry) = checker(&cfg);

    let started = Instant::now();
    // Different names: hickory merges identical in-flight queries.
    let (first, second) = tokio::join!(checker.check("one.test"), checker.check("two.test"));
    let took = started.elapsed();

    unknown_reason(&first);
    unknown_reason(&second);
    assert!(took >= timeout * 2, "the checks overlapped: {took:?}");
}

#[tokio::test]
async fn a_second_nxdomain_check_is_answered_from_the_cache() {
    let dns = example_zone().start().await;
    let (checker, _registry) = checker(&config(&dns.nameserver()));

    let first = checker.check("nosuch.example.test").await;
    let queries = dns.queries();
    let second = checker.check("nosuch.example.test").await;

    assert_eq!(first, undeliverable(UndeliverableReason::NoSuchDomain));
    assert_eq!(second, first);
    assert_eq!(queries, 1);
    assert_eq!(dns.queries(), queries, "the second check asked the server");
    dns.stop().await;
}

#[tokio::test]
async fn cached_answers_outlive_the_name_server() {
    let dns = example_zone().start().await;
    let (checker, _registry) = checker(&config(&dns.nameserver()));
    let mx = checker.check("mx.example.test").await;
    let implicit = checker.check("aspfother.example.test").await;
    dns.stop().await;

    assert_eq!(checker.check("mx.example.test").await, mx);
    assert_eq!(checker.check("aspfother.example.test").await, implicit);
}

#[tokio::test]
async fn zero_negative_ttl_turns_negative_caching_off() {
    let dns = example_zone().start().await;
    let cfg = DnsConfig {
        negative_ttl_seconds: 0,
        ..config(&dns.nameserver())
    };
    let (checker, _registry) = checker(&cfg);

    checker.check("nosuch.example.test").await;
    checker.check("nosuch.example.test").await;

    assert_eq!(dns.queries(), 2);
    dns.stop().await;
}

#[tokio::test]
async fn failures_are_not_cached() {
    let dns = example_zone().start().await;
    let (checker, _registry) = checker(&config(&dns.nameserver()));

    checker.check("broken.example.test").await;
    let queries = dns.queries();
    checker.check("broken.example.test").await;

    assert!(dns.queries() > queries, "the SERVFAIL was cached");
    dns.stop().await;
}

#[tokio::test]
async fn every_outcome_series_exists_from_registration_and_counts_checks() {
    let dns = example_zone().start().await;
    let (checker, registry) = checker(&config(&dns.nameserver()));

    let fresh = metrics_text(&registry);
    for outcome in ["deliverable", "undeliverable", "unknown"] {
        assert!(
            fresh.contains(&format!(
                r#"verigate_dns_checks_total{{outcome="{outcome}"}} 0"#
            )),
            "{fresh}"
        );
        assert!(
            fresh.contains(&format!(
                r#"verigate_dns_lookup_duration_seconds_count{{outcome="{outcome}"}} 0"#
            )),
            "{fresh}"
        );
    }

    checker.check("mx.example.test").await;
    checker.check("aonly.example.test").await;
    checker.check("nosuch.example.test").await;
    checker.check("broken.example.test").await;

    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"verigate_dns_checks_total{outcome="deliverable"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"verigate_dns_checks_total{outcome="undeliverable"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"verigate_dns_checks_total{outcome="unknown"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"verigate_dns_lookup_duration_seconds_count{outcome="deliverable"} 2"#),
        "{text}"
    );
    dns.stop().await;
}

#[test]
fn registering_the_metrics_twice_in_one_registry_fails() {
    let registry = Registry::new_custom(Some("verigate".into()), None).expect("registry");
    DnsMetrics::register(&registry).expect("first registration");
    assert!(DnsMetrics::register(&registry).is_err());
}

#[test]
fn a_bad_nameserver_is_a_construction_error_naming_it() {
    let registry = Registry::new_custom(Some("verigate".into()), None).expect("registry");
    let metrics = DnsMetrics::register(&registry).expect("register DNS metrics");
    let cfg = DnsConfig {
        nameservers: vec!["127.0.0.1:5353".into(), "dns.example.test".into()],
        ..DnsConfig::default()
    };
    let error = DomainChecker::new(&cfg, metrics).expect_err("a host name is not an address");
    assert!(
        matches!(&error, Error::InvalidNameserver { value, .. } if value == "dns.example.test")
    );
    assert!(error.to_string().contains("dns.example.test"), "{error}");
}

#[test]
fn zero_attempts_is_a_construction_error() {
    let registry = Registry::new_custom(Some("verigate".into()), None).expect("registry");
    let metrics = DnsMetrics::register(&registry).expect("register DNS metrics");
    let cfg = DnsConfig {
        nameservers: vec!["127.0.0.1".into()],
        attempts: 0,
        ..DnsConfig::default()
    };
    let error = DomainChecker::new(&cfg, metrics).expect_err("zero tries");
    assert!(
        matches!(error, Error::Zero { key: "attempts" }),
        "{error:?}"
    );
}

#[test]
fn a_checker_is_built_without_a_runtime_or_network() {
    // Construction sends nothing; a checker can be built before the runtime starts.
    let (checker, _registry) = checker(&config("192.0.2.1:53"));
    assert!(format!("{checker:?}").contains("DomainChecker"));
}

/// Creating a verification applies the same checks, against a real authoritative server.
mod on_create {
    use std::net::Ipv4Addr;

    use serde_json::json;

    use crate::support::app::spawn_app_with;
    use crate::support::fake_dns::{FakeDns, SilentDns};

    #[tokio::test]
    async fn undeliverable_domains_are_refused_before_anything_is_queued() {
        let dns = FakeDns::builder("example.com")
            .mx("good", 10, "mx1")
            .a("mx1", Ipv4Addr::new(1, 1, 1, 1))
            .mx("nullmx", 0, ".")
            .start()
            .await;
        let app = spawn_app_with(&format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout_ms = 500\n",
            dns.nameserver()
        ))
        .await;
        let r = app.create(json!({"email": "a@good.example.com"})).await;
        assert_eq!(r.status, 202, "{}", r.text());
        for (email, reason) in [
            ("a@nullmx.example.com", "null_mx"),
            ("a@missing.example.com", "no_such_domain"),
        ] {
            let r = app.create(json!({ "email": email })).await;
            assert_eq!(r.status, 422, "{email}: {}", r.text());
            assert_eq!(r.error_code(), "undeliverable_domain");
            assert_eq!(r.json()["error"]["reason"], reason);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(crate::support::mail::read_all(&app.mail_dir()).len(), 1);
    }

    #[tokio::test]
    async fn a_dns_outage_follows_on_failure() {
        let silent = SilentDns::start();
        let accept = spawn_app_with(&format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout_ms = 100\ndeadline_ms = 300\n",
            silent.nameserver()
        ))
        .await;
        let r = accept.create(json!({"email": "a@example.org"})).await;
        assert_eq!(r.status, 202, "accept: {}", r.text());
        let reject = spawn_app_with(&format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout_ms = 100\ndeadline_ms = 300\non_failure = \"reject\"\n",
            silent.nameserver()
        ))
        .await;
        let r = reject.create(json!({"email": "a@example.org"})).await;
        assert_eq!(r.status, 422, "reject: {}", r.text());
        assert_eq!(r.json()["error"]["reason"], "dns_unavailable");
    }
}
