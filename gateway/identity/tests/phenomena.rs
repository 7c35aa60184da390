//! The phenomena of Japanese records, one test each: variations of one person must end
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! `link` (or `review` where the brief allows), look-alikes of different people must not
//! end `link`. All with the built-in default model, as `gatewayd identity match` runs.

use gateway_identity::{Decision, Index, Matcher, Model, Record};

fn rec(fields: &[(&str, &str)]) -> Record {
    let mut m = serde_json::Map::new();
    for (k, v) in fields {
        m.insert((*k).into(), serde_json::Value::String((*v).into()));
    }
    serde_json::from_value(serde_json::Value::Object(m)).expect("record fields")
}

/// A complete record of one person (hospital A style).
fn base() -> Vec<(&'static str, &'static str)> {
    vec![
        ("hospital_id", "H1"),
        ("patient_id", "12345"),
        ("family_name", "髙橋"),
        ("given_name", "恵子"),
        ("family_kana", "タカハシ"),
        ("given_kana", "ケイコ"),
        ("sex", "F"),
        ("birth_date", "1980-01-02"),
        ("address", "東京都新宿区西新宿二丁目8番1号"),
        ("postal_code", "160-0023"),
        ("phone", "03-1234-5678"),
        ("insurer_number", "06130012"),
        ("insurance_symbol", "12"),
        ("insurance_number", "3456"),
        ("insurance_branch", "01"),
    ]
}

fn with(changes: &[(&'static str, &'static str)]) -> Record {
    let mut f = base();
    for (k, v) in changes {
        f.retain(|(x, _)| x != k);
        if !v.is_empty() {
            f.push((k, v));
        }
    }
    rec(&f)
}

fn decide(a: &Record, b: &Record) -> Decision {
    Matcher::new(Model::default()).compare(a, b).decision
}

fn assert_link(changes: &[(&'static str, &'static str)]) {
    let d = decide(&rec(&base()), &with(changes));
    assert_eq!(d, Decision::Link, "{changes:?}");
}

fn assert_found(changes: &[(&'static str, &'static str)]) {
    let d = decide(&rec(&base()), &with(changes));
    assert_ne!(d, Decision::Distinct, "{changes:?}");
}

fn assert_not_link(changes: &[(&'static str, &'static str)]) {
    let d = decide(&rec(&base()), &with(changes));
    assert_ne!(d, Decision::Link, "{changes:?}");
}

fn assert_distinct(changes: &[(&'static str, &'static str)]) {
    let d = decide(&rec(&base()), &with(changes));
    assert_eq!(d, Decision::Distinct, "{changes:?}");
}

#[test]
fn identical_records_link() {
    assert_link(&[]);
}

#[test]
fn variant_kanji_including_non_bmp_and_compat_ideographs_link() {
    assert_link(&[("family_name", "高橋")]);
    assert_link(&[("family_name", "\u{FA11}橋")]); // odd but must not break
    let a = with(&[("family_name", "吉田"), ("family_kana", "ヨシダ")]);
    let b = with(&[("family_name", "\u{20BB7}田"), ("family_kana", "ヨシダ")]);
    assert_eq!(decide(&a, &b), Decision::Link);
    let a = with(&[("family_name", "山崎"), ("family_kana", "ヤマザキ")]);
    let b = with(&[("family_name", "山\u{FA11}"), ("family_kana", "ﾔﾏｻﾞｷ")]);
    assert_eq!(decide(&a, &b), Decision::Link);
    let a = with(&[("family_name", "渡辺"), ("family_kana", "ワタナベ")]);
    let b = with(&[
        ("family_name", "渡邊\u{E0100}"),
        ("family_kana", "ワタナベ"),
    ]);
    assert_eq!(decide(&a, &b), Decision::Link);
}

#[test]
fn kana_scripts_half_width_and_long_vowels_link() {
    assert_link(&[("family_kana", "たかはし"), ("given_kana", "けいこ")]);
    assert_link(&[("family_kana", "ﾀｶﾊｼ"), ("given_kana", "ｹｲｺ")]);
    assert_link(&[("given_kana", "ケーコ")]);
    let a = with(&[("family_name", "佐藤"), ("family_kana", "サトウ")]);
    let b = with(&[("family_name", "佐藤"), ("family_kana", "サトー")]);
    assert_eq!(decide(&a, &b), Decision::Link);
    let a = with(&[("given_name", "京子"), ("given_kana", "キョウコ")]);
    let b = with(&[("given_name", "京子"), ("given_kana", "ｷﾖｳｺ")]);
    assert_eq!(decide(&a, &b), Decision::Link);
}

#[test]
fn era_dates_in_every_form_link() {
    for d in [
        "昭和55年1月2日",
        "S55.1.2",
        "S55/01/02",
        "s550102",
        "3550102",
        "１９８０年１月２日",
        "19800102",
    ] {
        assert_link(&[("birth_date", d)]);
    }
}

#[test]
fn address_notations_and_missing_prefecture_or_building_link() {
    for a in [
        "新宿区西新宿2-8-1",
        "東京都新宿区西新宿２－８－１ 都庁ビル 101号室",
        "新宿区西新宿2丁目8番地1",
        "新宿区西新宿2ー8ー1",
    ] {
        assert_link(&[("address", a)]);
    }
}

#[test]
fn phones_with_punctuation_and_full_width_digits_link() {
    assert_link(&[("phone", "0312345678")]);
    assert_link(&[("phone", "（０３）１２３４－５６７８")]);
    assert_link(&[("phone", "+81-3-1234-5678")]);
}

#[test]
fn insurance_change_with_a_job_still_links() {
    assert_link(&[
        ("insurer_number", "01130099"),
        ("insurance_symbol", "7"),
        ("insurance_number", "99"),
    ]);
}

#[test]
fn marriage_name_change_links_or_is_reviewed() {
    // Family name changed; given, birth date, address, phone the same: link.
    assert_link(&[("family_name", "鈴木"), ("family_kana", "スズキ")]);
    // Changed and moved and a new phone: a person looks.
    assert_found(&[
        ("family_name", "鈴木"),
        ("family_kana", "スズキ"),
        ("address", "大阪府大阪市北区梅田1-1-1"),
        ("postal_code", "530-0001"),
        ("phone", "090-9999-0000"),
        ("insurer_number", "01270001"),
        ("insurance_number", "1"),
    ]);
}

#[test]
fn unsplit_and_swapped_names_link() {
    assert_link(&[
        ("family_name", "髙橋 恵子"),
        ("given_name", ""),
        ("family_kana", "タカハシ ケイコ"),
        ("given_kana", ""),
    ]);
    assert_link(&[
        ("family_name", "高橋恵子"),
        ("given_name", ""),
        ("family_kana", "タカハシケイコ"),
        ("given_kana", ""),
    ]);
    assert_link(&[
        ("family_name", "恵子"),
        ("given_name", "高橋"),
        ("family_kana", "ケイコ"),
        ("given_kana", "タカハシ"),
    ]);
}

#[test]
fn typing_errors_are_linked_or_reviewed() {
    assert_found(&[("given_kana", "ケイユ")]);
    assert_found(&[("given_name", "恵于")]);
    assert_link(&[("birth_date", "1980-01-03")]);
    assert_link(&[("birth_date", "1980-02-01")]); // day/month swapped
    assert_link(&[("birth_date", "1981-01-02")]); // units digit of the year
    assert_found(&[("birth_date", "1990-01-02")]); // tens digit of the year: reviewed
    assert_link(&[("phone", "03-1234-5679")]);
    assert_found(&[("family_name", "髙槗"), ("family_kana", "タカハツ")]);
}

#[test]
fn missing_fields_are_not_evidence_against() {
    assert_link(&[("phone", ""), ("insurance_number", ""), ("postal_code", "")]);
    assert_link(&[("family_kana", ""), ("given_kana", ""), ("sex", "")]);
}

#[test]
fn twins_do_not_link() {
    assert_not_link(&[
        ("given_name", "恵美"),
        ("given_kana", ""),
        ("insurance_branch", "02"),
    ]);
    assert_distinct(&[
        ("given_name", "由美"),
        ("given_kana", "ユミ"),
        ("insurance_branch", "02"),
    ]);
    // Similar names (翔太 / 翔平): a person looks at most.
    let a = with(&[
        ("given_name", "翔太"),
        ("given_kana", "ショウタ"),
        ("sex", "M"),
    ]);
    let b = with(&[
        ("given_name", "翔平"),
        ("given_kana", ""),
        ("sex", "M"),
        ("insurance_branch", "02"),
    ]);
    assert_ne!(decide(&a, &b), Decision::Link);
}

#[test]
fn parent_and_child_with_the_same_given_name_do_not_link() {
    assert_distinct(&[("birth_date", "1955-06-20"), ("insurance_branch", "00")]);
    // Born on the same day of the year, a generation apart: a person looks at most.
    assert_not_link(&[("birth_date", "1955-01-02"), ("insurance_branch", "00")]);
    assert_not_link(&[
        ("birth_date", "S30.1.2"),
        ("phone", ""),
        ("insurance_number", ""),
    ]);
}

#[test]
fn spouses_and_siblings_do_not_link() {
    assert_distinct(&[
        ("given_name", "浩"),
        ("given_kana", "ヒロシ"),
        ("sex", "M"),
        ("birth_date", "1978-04-11"),
        ("insurance_branch", "00"),
    ]);
    assert_distinct(&[
        ("given_name", "恵美"),
        ("given_kana", "エミ"),
        ("birth_date", "1983-09-30"),
    ]);
}

#[test]
fn nursing_home_residents_do_not_link() {
    let home = [
        ("address", "千葉県千葉市中央区本町1-2-3 ケアホーム桜"),
        ("phone", "043-111-2222"),
        ("postal_code", "260-0001"),
    ];
    let mut a = home.to_vec();
    a.extend([
        ("family_name", "中村"),
        ("given_name", "ハル"),
        ("birth_date", "S5.3.3"),
        ("sex", "F"),
    ]);
    let mut b = home.to_vec();
    b.extend([
        ("family_name", "中村"),
        ("given_name", "トメ"),
        ("birth_date", "S6.7.1"),
        ("sex", "F"),
    ]);
    assert_eq!(decide(&rec(&a), &rec(&b)), Decision::Distinct);
}

#[test]
fn namesakes_born_the_same_day_are_at_most_reviewed() {
    let a = rec(&[
        ("family_name", "佐藤"),
        ("given_name", "翔太"),
        ("family_kana", "サトウ"),
        ("given_kana", "ショウタ"),
        ("sex", "M"),
        ("birth_date", "1990-05-05"),
        ("address", "札幌市中央区北1条西2-1"),
        ("phone", "011-222-3333"),
    ]);
    let b = rec(&[
        ("family_name", "佐藤"),
        ("given_name", "翔太"),
        ("family_kana", "サトウ"),
        ("given_kana", "ショウタ"),
        ("sex", "M"),
        ("birth_date", "H2.5.5"),
        ("address", "福岡市博多区博多駅前3-3-3"),
        ("phone", "092-444-5555"),
    ]);
    assert_ne!(decide(&a, &b), Decision::Link);
}

#[test]
fn namesakes_born_the_same_day_without_contact_fields_are_at_most_reviewed() {
    let a = rec(&[
        ("family_name", "佐藤"),
        ("given_name", "翔太"),
        ("sex", "M"),
        ("birth_date", "1990-05-05"),
    ]);
    let b = rec(&[
        ("family_name", "佐藤"),
        ("given_name", "翔太"),
        ("sex", "M"),
        ("birth_date", "H2.5.5"),
        ("phone", "092-444-5555"),
    ]);
    assert_eq!(decide(&a, &b), Decision::Review);
}

#[test]
fn a_common_name_weighs_less_than_a_rare_one() {
    let m = Matcher::new(Model::default());
    let common = |f: &'static str, k: &'static str| {
        with(&[
            ("family_name", f),
            ("family_kana", k),
            ("address", ""),
            ("phone", ""),
            ("insurance_number", ""),
        ])
    };
    let s_common = m
        .compare(&common("佐藤", "サトウ"), &common("佐藤", "サトウ"))
        .score;
    let s_rare = m
        .compare(
            &common("勅使河原", "テシガワラ"),
            &common("勅使河原", "テシガワラ"),
        )
        .score;
    assert!(s_rare > s_common + 3.0, "{s_rare} vs {s_common}");
}

#[test]
fn odd_input_never_panics() {
    let long = "亜".repeat(4000);
    let odd = [
        "",
        " ",
        "\u{0}",
        "\u{FFFF}",
        "\u{10FFFF}",
        "ﾞﾟ",
        "ー",
        "元",
        "S",
        "昭和元年",
        "S4294967295.1.1",
        "昭和99999999999年1月1日",
        "3999999999",
        "99999999999999999999",
        "-",
        "丁目",
        &long,
        "\u{E0100}\u{E0100}",
    ];
    let m = Matcher::new(Model::default());
    let fields = [
        "family_name",
        "given_name",
        "family_kana",
        "given_kana",
        "sex",
        "birth_date",
        "address",
        "postal_code",
        "phone",
        "insurer_number",
        "insurance_symbol",
        "insurance_number",
        "insurance_branch",
    ];
    let mut index = Index::new();
    for (i, v) in odd.iter().enumerate() {
        let all: Vec<(&str, &str)> = fields.iter().map(|f| (*f, *v)).collect();
        let r = rec(&all);
        let c = m.compare(&r, &rec(&base()));
        assert!(c.score.is_finite());
        m.compare(&r, &r);
        let p = m.prepare(&r);
        index.insert(i, &p);
        index.candidates(&p);
        index.remove(&i, &p);
    }
}

#[test]
fn blocking_finds_the_true_match_under_a_typo_in_any_one_field() {
    let m = Matcher::new(Model::default());
    let mut index = Index::new();
    // Distractors first, then the person.
    for i in 0..200u32 {
        let d = format!("19{:02}-{:02}-{:02}", 30 + i % 60, 1 + i % 12, 1 + i % 28);
        let f = format!("田中{i}");
        let r = rec(&[
            ("family_name", &f),
            ("given_name", "一郎"),
            ("birth_date", &d),
        ]);
        index.insert(i, &m.prepare(&r));
    }
    index.insert(999, &m.prepare(&rec(&base())));
    let variants: Vec<Vec<(&'static str, &'static str)>> = vec![
        vec![("birth_date", "1980-01-03")],
        vec![("birth_date", "1981-01-02")],
        vec![("family_kana", "タカバシ"), ("family_name", "高槗")],
        vec![("given_kana", "ケイユ"), ("given_name", "恵于")],
        vec![("family_name", "鈴木"), ("family_kana", "スズキ")],
        vec![("phone", ""), ("birth_date", "1980-01-02")],
        vec![
            ("family_name", "高橋恵子"),
            ("given_name", ""),
            ("family_kana", "タカハシケイコ"),
            ("given_kana", ""),
        ],
    ];
    for v in &variants {
        let q = m.prepare(&with(v));
        let c = index.candidates(&q);
        assert!(c.contains(&999), "{v:?}");
        assert!(c.len() < 50, "{v:?}: {} candidates", c.len());
    }
    let p = m.prepare(&rec(&base()));
    index.remove(&999, &p);
    assert!(!index.candidates(&p).contains(&999));
}
