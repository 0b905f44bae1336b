//! docker-compose.yml cannot run here (no Docker engine), so this keeps it valid: the services
//! users rely on exist, bind to loopback, and PostgreSQL runs with logical decoding.

use serde_yaml::Value;

fn compose() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml");
    let text = std::fs::read_to_string(path).expect("read docker-compose.yml");
    serde_yaml::from_str(&text).expect("docker-compose.yml is valid YAML")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no `{name}` service"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_has_the_four_services_with_the_official_images() {
    let compose = compose();
    let image = |name: &str| service(&compose, name)["image"].as_str().map(str::to_owned);
    assert!(image("postgres").is_some_and(|i| i.starts_with("postgres:")));
    assert!(image("kafka").is_some_and(|i| i.starts_with("apache/kafka:4")));
    assert!(
        image("elasticsearch")
            .is_some_and(|i| i.starts_with("docker.elastic.co/elasticsearch/elasticsearch:8."))
    );
    assert_eq!(service(&compose, "walsync")["build"].as_str(), Some("."));
    assert!(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).exists(),
        "the walsync service is built from the Dockerfile"
    );
}

#[test]
fn compose_postgres_runs_with_logical_wal_level() {
    let compose = compose();
    let command = strings(&service(&compose, "postgres")["command"]);
    assert!(
        command
            .windows(2)
            .any(|w| w[0] == "-c" && w[1] == "wal_level=logical"),
        "postgres command must set wal_level=logical: {command:?}"
    );
}

#[test]
fn compose_publishes_each_port_on_loopback_only() {
    let compose = compose();
    let expected = [
        ("postgres", "127.0.0.1:5432:5432"),
        ("kafka", "127.0.0.1:29092:29092"),
        ("elasticsearch", "127.0.0.1:9200:9200"),
        ("walsync", "127.0.0.1:9898:9898"),
    ];
    for (name, port) in expected {
        let ports = strings(&service(&compose, name)["ports"]);
        assert_eq!(ports, vec![port.to_owned()], "ports of {name}");
    }
}

#[test]
fn compose_walsync_serves_metrics_on_every_interface_of_its_container() {
    let compose = compose();
    let environment = &service(&compose, "walsync")["environment"];
    assert_eq!(
        environment["WALSYNC_METRICS__LISTEN"].as_str(),
        Some("0.0.0.0:9898"),
        "a container's loopback is unreachable through the published port 9898"
    );
}

#[test]
fn compose_elasticsearch_is_single_node_without_security() {
    let compose = compose();
    let environment = &service(&compose, "elasticsearch")["environment"];
    assert_eq!(environment["discovery.type"].as_str(), Some("single-node"));
    assert_eq!(
        environment["xpack.security.enabled"].as_str(),
        Some("false")
    );
}
