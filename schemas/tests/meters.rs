//! Meters defined over the event's payload, end to end through the core: the catalogue TOML, the
//! decoder, the wire encoding and the roll-up into cells.

use tally_schemas::event::{decode_batch, decode_event};
use tally_schemas::meter::Dimension;
use tally_schemas::rollup::{Cell, Rollup};
use tally_schemas::{Catalog, Record, TimePolicy, UsageEvent, wire};

const NOW: i64 = 1_795_255_200_000; // 2026-11-21T10:00:00Z

const CATALOG: &str = r#"
[meters.api_requests]
aggregation = "count"
unit = "requests"

[meters.requests]
event_type = "request"
aggregation = "count"
unit = "requests"

[meters.request_bytes]
event_type = "request"
value = "$.bytes"
aggregation = "sum"
unit = "bytes"
group_by = { region = "$.region", model = "$.model" }

[meters.eu_requests]
event_type = "request"
aggregation = "count"
unit = "requests"
filter = [{ path = "$.region", eq = "eu" }]

[meters.gpu_hours]
event_type = "gpu"
value = "$.usage.hours"
scale = 3
aggregation = "sum"
unit = "hours"
filter = [{ path = "$.kind", in = ["a100", "h100"] }]

[plans.free]
display_name = "Free"
limits = { requests = 10, gpu_hours = 1500 }
"#;

fn catalog() -> Catalog {
    Catalog::from_toml(CATALOG).unwrap()
}

fn event(ty: &str, data: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"e-1","source":"edge","type":"{ty}","subject":"cust_1","data":{data}}}"#
    )
}

fn decode(ty: &str, data: &str) -> Result<UsageEvent, tally_schemas::EventError> {
    decode_event(&event(ty, data), &catalog(), &TimePolicy::default(), NOW)
}

fn dims(pairs: &[(&str, &str)]) -> Vec<Dimension> {
    pairs
        .iter()
        .map(|(n, v)| Dimension {
            name: (*n).into(),
            value: (*v).into(),
        })
        .collect()
}

#[test]
fn one_request_event_feeds_three_meters_and_survives_the_wire() {
    let e = decode(
        "request",
        r#"{"bytes": 1200, "region": "eu", "model": "m1", "other": [1, 2]}"#,
    )
    .unwrap();
    assert_eq!((e.meter.as_str(), e.value), ("request", 0));
    let readings: Vec<(&str, u64, &[Dimension])> = e
        .readings()
        .map(|r| (r.meter, r.value, r.dimensions))
        .collect();
    let by_region = dims(&[("model", "m1"), ("region", "eu")]);
    assert_eq!(
        readings,
        [
            ("eu_requests", 1, &[][..]),
            ("request_bytes", 1200, &by_region[..]),
            ("requests", 1, &[][..]),
        ]
    );
    assert_eq!(wire::decode(&wire::encode(&e)).unwrap(), e);
}

#[test]
fn a_plain_meter_travels_as_before() {
    let e = decode("api_requests", r#"{"value": 3}"#).unwrap();
    assert!(e.readings.is_empty());
    assert_eq!((e.meter.as_str(), e.value), ("api_requests", 3));
    let readings: Vec<(&str, u64)> = e.readings().map(|r| (r.meter, r.value)).collect();
    assert_eq!(readings, [("api_requests", 3)]);
}

#[test]
fn filters_scales_and_missing_values() {
    let e = decode("gpu", r#"{"kind": "h100", "usage": {"hours": 1.25}}"#).unwrap();
    let readings: Vec<(&str, u64)> = e.readings().map(|r| (r.meter, r.value)).collect();
    assert_eq!(readings, [("gpu_hours", 1250)], "1.25 h at scale 3");
    let e = decode("gpu", r#"{"kind": "t4", "usage": {"hours": 2}}"#).unwrap();
    assert_eq!(
        e.readings().count(),
        0,
        "filtered out: accepted, feeds nothing"
    );
    let codes = |ty: &str, data: &str| decode(ty, data).unwrap_err().code();
    assert_eq!(
        codes("gpu", r#"{"kind": "a100", "usage": {}}"#),
        "value_missing"
    );
    assert_eq!(
        codes("gpu", r#"{"kind": "a100", "usage": {"hours": 0.0005}}"#),
        "value_precision"
    );
    assert_eq!(
        codes("gpu", r#"{"kind": "a100", "usage": {"hours": "many"}}"#),
        "invalid_value"
    );
    assert_eq!(
        codes("gpu", r#"{"kind": "a100", "usage": {"hours": -1}}"#),
        "negative_value"
    );
    assert_eq!(codes("request", r#"{"region": "eu"}"#), "value_missing");
    assert_eq!(
        codes("request", r#"{"bytes": 1, "region": ["eu"]}"#),
        "invalid_dimension"
    );
    assert_eq!(codes("no_such_type", "{}"), "unknown_meter");
    let e = decode("gpu", r#"{"kind": "a100", "usage": {"hours": "0.001"}}"#).unwrap();
    assert_eq!(e.readings().next().unwrap().value, 1);
}

#[test]
fn batches_decode_payload_meters_element_by_element() {
    let body = format!(
        "[{}, {}]",
        event("request", r#"{"bytes": 10, "region": "us"}"#),
        event("request", r#"{"region": "us"}"#)
    );
    let got = decode_batch(&body, &catalog(), &TimePolicy::default(), NOW, 10).unwrap();
    assert_eq!(got[0].as_ref().unwrap().readings.len(), 2);
    assert_eq!(got[1].as_ref().unwrap_err().code(), "value_missing");
}

#[test]
fn the_rollup_counts_each_meter_of_an_event() {
    let records: Vec<Record> = [
        r#"{"bytes": 1200, "region": "eu", "model": "m1"}"#,
        r#"{"bytes": 800, "region": "us"}"#,
    ]
    .iter()
    .enumerate()
    .map(|(i, data)| {
        let mut e = decode("request", data).unwrap();
        e.id = format!("e-{i}");
        Record {
            partition: 0,
            offset: i as u64,
            event: e,
        }
    })
    .collect();
    let r = Rollup::from_records(&records, &catalog());
    let mut cells: Vec<(String, String, u64)> = r
        .cells
        .iter()
        .map(|(k, c)| {
            let Cell::Add(v) = c else {
                panic!("additive meters")
            };
            (k.meter.clone(), k.dims.clone(), *v)
        })
        .collect();
    cells.sort();
    assert_eq!(
        cells,
        [
            ("eu_requests".to_owned(), String::new(), 1),
            (
                "request_bytes".to_owned(),
                r#"{"model":"m1","region":"eu"}"#.to_owned(),
                1200
            ),
            (
                "request_bytes".to_owned(),
                r#"{"region":"us"}"#.to_owned(),
                800
            ),
            ("requests".to_owned(), String::new(), 2),
        ]
    );
    assert_eq!(r.events, 2);
}

#[test]
fn the_catalogue_refuses_meters_it_cannot_read_with_reasons() {
    let with = |meter: &str| {
        format!("[meters.m]\nunit = \"u\"\n{meter}\n[plans.free]\ndisplay_name = \"F\"\n")
    };
    for (meter, why) in [
        (
            "aggregation = \"count\"\nevent_type = \"t\"\nvalue = \"$.n\"",
            "takes no `value`",
        ),
        (
            "aggregation = \"sum\"\nevent_type = \"t\"",
            "names its `value` path",
        ),
        ("aggregation = \"sum\"\nvalue = \"n\"", "invalid JSON path"),
        ("aggregation = \"sum\"\nscale = 13", "`scale` is at most 12"),
        (
            "aggregation = \"sum\"\ngroup_by = { Region = \"$.r\" }",
            "dimension name `Region`",
        ),
        (
            "aggregation = \"sum\"\nfilter = [{ path = \"$.r\", eq = \"a\", ne = \"b\" }]",
            "exactly one of eq, ne or in",
        ),
        (
            "aggregation = \"sum\"\nfilter = [{ path = \"$.r\", in = [] }]",
            "exactly one of eq, ne or in",
        ),
        (
            "aggregation = \"unique_count\"\nevent_type = \"t\"",
            "names the `value` path it counts",
        ),
        (
            "aggregation = \"unique_count\"",
            "names the `value` path it counts",
        ),
        (
            "aggregation = \"unique_count\"\nevent_type = \"t\"\nvalue = \"$.u\"\nscale = 2",
            "takes no `scale`",
        ),
        (
            "aggregation = \"unique_count\"\nevent_type = \"t\"\nvalue = \"$.u\"\ngroup_by = { r = \"$.r\" }",
            "kept for count and sum meters only",
        ),
    ] {
        let err = Catalog::from_toml(&with(meter)).unwrap_err().to_string();
        assert!(err.contains(why), "{meter}: {err}");
    }
    let ok = with("aggregation = \"sum\"\nevent_type = \"t\"\nvalue = \"$.n\"\nscale = 2");
    let c = Catalog::from_toml(&ok).unwrap();
    assert!(c.event_type("t").is_some());
    assert!(
        c.event_type("m").is_none(),
        "the meter reads `t`, not its name"
    );
}
