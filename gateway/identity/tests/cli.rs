//! `identity match|learn|search` over in-memory JSON lines.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use gateway_identity::cli::{self, CliError, SearchOptions};
use gateway_identity::{Matcher, Model};

fn run_match(
    input: &str,
) -> (
    Result<cli::MatchStats, CliError>,
    Vec<serde_json::Value>,
    String,
) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let r = cli::match_pairs(
        input.as_bytes(),
        &mut out,
        &mut err,
        &Matcher::new(Model::default()),
    );
    let lines = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (r, lines, String::from_utf8(err).unwrap())
}

const SAME: &str = r#""a": {"family_name": "山田", "given_name": "太郎", "birth_date": "1980-01-02", "phone": "03-1111-2222", "sex": "M"}, "b": {"family_name": "山田", "given_name": "太郎", "birth_date": "S55.1.2", "phone": 311112222, "sex": 1, "postal_code": null, "unknown": {"x": 1}}"#;
const OTHER: &str = r#""a": {"family_name": "山田", "given_name": "太郎", "birth_date": "1980-01-02"}, "b": {"family_name": "木村", "given_name": "花子", "birth_date": "1999-09-09"}"#;

#[test]
fn match_prints_one_line_per_pair_in_input_order_with_lenient_records() {
    let input = format!(
        "{{\"pair_id\": \"p2\", {SAME}}}\n\n{{\"pair_id\": \"p1\", {OTHER}}}\n{{\"pair_id\": 7, {SAME}}}"
    );
    let (r, lines, err) = run_match(&input);
    assert_eq!(r.unwrap().pairs, 3);
    assert!(err.is_empty());
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["pair_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["p2", "p1", "7"]);
    assert_eq!(lines[0]["decision"], "link");
    assert_eq!(lines[1]["decision"], "distinct");
    assert!(lines[0]["score"].as_f64().unwrap() > lines[1]["score"].as_f64().unwrap());
    assert_eq!(lines[0].as_object().unwrap().len(), 3);
}

#[test]
fn a_bad_line_is_named_by_number_without_content_and_the_rest_still_printed() {
    let input = format!(
        "{{\"pair_id\": \"p1\", {SAME}}}\n{{\"pair_id\": \"secret-山田\", \"a\": 5}}\nnot json 山田\n{{\"pair_id\": \"p4\", {OTHER}}}\n"
    );
    let (r, lines, err) = run_match(&input);
    match r {
        Err(CliError::BadLines {
            count: 2, first: 2, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["pair_id"], "p4");
    assert!(err.contains("line 2:") && err.contains("line 3:"), "{err}");
    assert!(!err.contains("山田") && !err.contains("secret"), "{err}");
}

#[test]
fn learn_writes_a_model_that_loads_and_search_finds_the_person() {
    let mut records = String::new();
    for i in 0..300 {
        records.push_str(&format!(
            "{{\"hospital_id\": \"H1\", \"patient_id\": \"{i}\", \"family_name\": \"姓{i}\", \"given_name\": \"名{}\", \"birth_date\": \"19{:02}-{:02}-{:02}\", \"phone\": \"03-{:04}-{:04}\"}}\n",
            i % 7,
            40 + i % 50,
            1 + i % 12,
            1 + i % 28,
            i,
            i * 7
        ));
    }
    // The same people again at a second hospital, with variations.
    for i in 0..100 {
        records.push_str(&format!(
            "{{\"hospital_id\": \"H2\", \"patient_id\": \"x{i}\", \"family_name\": \"姓{i}\", \"given_name\": \"名{}\", \"birth_date\": \"19{:02}/{}/{}\", \"phone\": \"03{:04}{:04}\"}}\n",
            i % 7,
            40 + i % 50,
            1 + i % 12,
            1 + i % 28,
            i,
            i * 7
        ));
    }
    let model = cli::learn_records(records.as_bytes()).unwrap();
    let dir = std::env::temp_dir().join(format!("identity-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.json");
    model.save(&path).unwrap();
    let loaded = Model::load(&path).unwrap();
    assert_eq!(loaded.link_threshold, model.link_threshold);
    for (a, b) in loaded.fields.iter().zip(&model.fields) {
        for (x, y) in a.m.iter().chain(&a.u).zip(b.m.iter().chain(&b.u)) {
            assert!((x - y).abs() < 1e-12);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();

    let queries = "{\"family_name\": \"姓42\", \"given_name\": \"名0\", \"birth_date\": \"S57.7.15\", \"phone\": \"0300420294\"}\n{\"family_name\": \"誰\", \"birth_date\": \"2020-01-01\"}\n";
    for brute_force in [false, true] {
        let opts = SearchOptions {
            learn: true,
            brute_force,
        };
        let report = cli::search(
            records.as_bytes(),
            queries.as_bytes(),
            Model::default(),
            opts,
        )
        .unwrap();
        assert_eq!(report.records, 400);
        assert_eq!(report.queries, 2);
        let best = report.answers[0].best.as_ref().unwrap();
        assert_eq!(
            best.patient_id.as_deref().unwrap().trim_start_matches('x'),
            "42"
        );
        assert_eq!(report.answers[0].decision, gateway_identity::Decision::Link);
        assert_ne!(report.answers[1].decision, gateway_identity::Decision::Link);
        let json = serde_json::to_value(&report).unwrap();
        for k in [
            "records",
            "load_ms",
            "learn_ms",
            "queries",
            "p50_us",
            "p99_us",
            "max_us",
            "mean_candidates",
            "peak_rss_kib",
            "answers",
        ] {
            assert!(json.get(k).is_some(), "{k}");
        }
        if brute_force {
            assert_eq!(report.mean_candidates, 400.0);
        } else {
            assert!(report.mean_candidates < 50.0);
        }
    }
}

#[test]
fn a_model_file_of_the_wrong_shape_is_refused() {
    let dir = std::env::temp_dir().join(format!("identity-bad-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.json");
    std::fs::write(
        &path,
        r#"{"link_threshold": 1, "review_threshold": 0, "fields": []}"#,
    )
    .unwrap();
    assert!(Model::load(&path).is_err());
    std::fs::write(&path, "not json").unwrap();
    assert!(Model::load(&path).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
