//! Name frequencies for the term-frequency adjustment: an exact agreement on 佐藤 is
//! weaker evidence than one on a rare family name, because two different people share
//! 佐藤 far more often.
//!
//! [`Frequencies::builtin`] is the table the command line uses without a registry: the
//! most common Japanese family names with their approximate share of the population
//! (published surname rankings, rounded), both in kanji and in their usual reading, and
//! the given names common across generations at a flat share. Names not in the table use
//! the model's `u`. [`Frequencies::from_prepared`] counts a registry instead.

use std::collections::HashMap;

use crate::matcher::Prepared;
use crate::normalize;

/// Share of records carrying a (folded) name value.
#[derive(Debug, Clone, Default)]
pub struct Frequencies {
    family: HashMap<Box<str>, f64>,
    given: HashMap<Box<str>, f64>,
}

/// (kanji, reading, percent of the population).
const FAMILY: &[(&str, &str, f64)] = &[
    ("佐藤", "サトウ", 1.50),
    ("鈴木", "スズキ", 1.43),
    ("高橋", "タカハシ", 1.13),
    ("田中", "タナカ", 1.06),
    ("伊藤", "イトウ", 0.86),
    ("渡辺", "ワタナベ", 0.86),
    ("山本", "ヤマモト", 0.86),
    ("中村", "ナカムラ", 0.84),
    ("小林", "コバヤシ", 0.82),
    ("加藤", "カトウ", 0.70),
    ("吉田", "ヨシダ", 0.66),
    ("山田", "ヤマダ", 0.65),
    ("佐々木", "ササキ", 0.55),
    ("山口", "ヤマグチ", 0.51),
    ("松本", "マツモト", 0.50),
    ("井上", "イノウエ", 0.49),
    ("木村", "キムラ", 0.46),
    ("斎藤", "サイトウ", 0.60),
    ("林", "ハヤシ", 0.42),
    ("清水", "シミズ", 0.41),
    ("山崎", "ヤマザキ", 0.39),
    ("森", "モリ", 0.38),
    ("池田", "イケダ", 0.35),
    ("橋本", "ハシモト", 0.35),
    ("阿部", "アベ", 0.35),
    ("石川", "イシカワ", 0.34),
    ("山下", "ヤマシタ", 0.33),
    ("中島", "ナカジマ", 0.33),
    ("石井", "イシイ", 0.32),
    ("小川", "オガワ", 0.31),
    ("前田", "マエダ", 0.31),
    ("岡田", "オカダ", 0.31),
    ("長谷川", "ハセガワ", 0.30),
    ("藤田", "フジタ", 0.30),
    ("後藤", "ゴトウ", 0.30),
    ("近藤", "コンドウ", 0.29),
    ("村上", "ムラカミ", 0.28),
    ("遠藤", "エンドウ", 0.27),
    ("青木", "アオキ", 0.27),
    ("坂本", "サカモト", 0.27),
    ("藤井", "フジイ", 0.26),
    ("西村", "ニシムラ", 0.26),
    ("福田", "フクダ", 0.26),
    ("太田", "オオタ", 0.25),
    ("三浦", "ミウラ", 0.25),
    ("藤原", "フジワラ", 0.24),
    ("岡本", "オカモト", 0.24),
    ("松田", "マツダ", 0.24),
    ("中川", "ナカガワ", 0.24),
    ("原田", "ハラダ", 0.23),
];

/// Given names common in one or more generations; readings shared by many spellings
/// (ヒロシ: 博 浩 弘 宏 洋...) are more common than any one spelling.
const GIVEN: &[&str] = &[
    "清",
    "博",
    "茂",
    "実",
    "勇",
    "修",
    "誠",
    "隆",
    "浩",
    "弘",
    "正",
    "進",
    "明",
    "健一",
    "和夫",
    "幸子",
    "和子",
    "節子",
    "洋子",
    "恵子",
    "京子",
    "美智子",
    "久美子",
    "裕子",
    "由美子",
    "直美",
    "明美",
    "智子",
    "陽子",
    "真由美",
    "大輔",
    "拓也",
    "健太",
    "翔太",
    "達也",
    "大樹",
    "翔",
    "蓮",
    "陽翔",
    "湊",
    "美咲",
    "陽菜",
    "結衣",
    "愛",
    "さくら",
    "葵",
    "花子",
    "太郎",
    "一郎",
];
const GIVEN_READINGS: &[(&str, f64)] = &[
    ("ヒロシ", 0.8),
    ("タカシ", 0.7),
    ("アキラ", 0.6),
    ("マコト", 0.5),
    ("キヨシ", 0.5),
    ("ススム", 0.4),
    ("ケイコ", 0.6),
    ("ユウコ", 0.6),
    ("ヨウコ", 0.5),
    ("カズコ", 0.5),
    ("サチコ", 0.5),
    ("ヒロコ", 0.5),
    ("キョウコ", 0.5),
    ("トモコ", 0.5),
    ("ミチコ", 0.5),
    ("ショウタ", 0.4),
    ("ダイスケ", 0.4),
    ("タクヤ", 0.4),
    ("ケンタ", 0.4),
    ("ミサキ", 0.4),
    ("ユイ", 0.4),
    ("アオイ", 0.4),
];
/// Share assumed for each of [`GIVEN`] (percent).
const GIVEN_SHARE: f64 = 0.3;

fn put(map: &mut HashMap<Box<str>, f64>, value: &str, share: f64) {
    if let Some(k) = normalize::name(value) {
        let e = map.entry(k.into_boxed_str()).or_insert(0.0);
        *e = e.max(share);
    }
}

impl Frequencies {
    /// The built-in table (see the module docs).
    pub fn builtin() -> Self {
        let mut f = Self::default();
        for (kanji, kana, pct) in FAMILY {
            put(&mut f.family, kanji, pct / 100.0);
            put(&mut f.family, kana, pct / 100.0);
        }
        for g in GIVEN {
            put(&mut f.given, g, GIVEN_SHARE / 100.0);
        }
        for (kana, pct) in GIVEN_READINGS {
            put(&mut f.given, kana, pct / 100.0);
        }
        f
    }

    /// Counts the names of a registry (kanji and kana values both counted).
    pub fn from_prepared<'a>(records: impl IntoIterator<Item = &'a Prepared>) -> Self {
        let mut family: HashMap<Box<str>, u32> = HashMap::new();
        let mut given: HashMap<Box<str>, u32> = HashMap::new();
        let mut n = 0u32;
        for p in records {
            n = n.saturating_add(1);
            for v in [&p.family, &p.family_kana].into_iter().flatten() {
                *family.entry(v.clone()).or_insert(0) += 1;
            }
            for v in [&p.given, &p.given_kana].into_iter().flatten() {
                *given.entry(v.clone()).or_insert(0) += 1;
            }
        }
        let share = |m: HashMap<Box<str>, u32>| {
            m.into_iter()
                .map(|(k, c)| (k, f64::from(c) / f64::from(n.max(1))))
                .collect()
        };
        Self {
            family: share(family),
            given: share(given),
        }
    }

    /// Share of a folded family name, if the table knows it.
    pub fn family(&self, folded: &str) -> Option<f64> {
        self.family.get(folded).copied()
    }

    /// Share of a folded given name, if the table knows it.
    pub fn given(&self, folded: &str) -> Option<f64> {
        self.given.get(folded).copied()
    }
}
