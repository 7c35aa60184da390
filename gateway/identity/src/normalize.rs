//! Normalisation of Japanese demographic fields, so that two spellings of the same value
//! compare equal.
//!
//! - [`name`]: NFKC width folding (full-width ASCII, half-width katakana with its
//!   dakuten), IVS / variation selectors dropped, 異体字 and old kanji forms (including
//!   characters outside JIS X 0208 and the unified ideographs of the compatibility block)
//!   mapped to one form ([`VARIANTS`]), hiragana -> katakana, small kana -> large,
//!   ヂ/ジ ヅ/ズ ヲ/オ ヴ/ブ ヰ/イ ヱ/エ, long vowels (ー and the spelled extensions
//!   オウ/オオ/ウウ/エイ/エエ/アア/イイ) folded away, every space and middle dot removed.
//! - [`date`]: western and Japanese era dates (明治..令和, `S55.1.2`, `s550102`, `平成元年`,
//!   the coded `3550102` form) to a checked `(year, month, day)`.
//! - [`address`]: prefecture dropped, kanji numerals and every 丁目/番地/番/号/の/hyphen
//!   notation to one separator, building tail dropped: a town plus block numbers.
//! - [`digits`], [`phone`], [`sex`]: the small fields.
//!
//! Every function is total: odd input gives `None` or a folded string, never a panic.

use unicode_normalization::UnicodeNormalization;

/// 異体字 / old forms -> the form used for comparison. Both sides of a comparison go
/// through the same table, so the choice of the canonical member only has to be
/// consistent. Sources: the name variants registries meet most (the 人名用漢字 old forms
/// and the 戸籍 variants clinics type with the nearest JIS X 0208 character).
pub const VARIANTS: &[(char, char)] = &[
    ('髙', '高'),
    ('\u{FA11}', '崎'), // 﨑, a unified ideograph without decomposition
    ('嵜', '崎'),
    ('碕', '崎'),
    ('\u{37E2}', '崎'),  // 㟢
    ('\u{2550E}', '崎'), // 𥔎
    ('邊', '辺'),
    ('邉', '辺'),
    ('齋', '斎'),
    ('齊', '斎'),
    ('斉', '斎'),
    ('澤', '沢'),
    ('濱', '浜'),
    ('濵', '浜'),
    ('廣', '広'),
    ('櫻', '桜'),
    ('國', '国'),
    ('圀', '国'),
    ('眞', '真'),
    ('彌', '弥'),
    ('嶋', '島'),
    ('嶌', '島'),
    ('冨', '富'),
    ('惠', '恵'),
    ('德', '徳'),
    ('槇', '槙'),
    ('籠', '篭'),
    ('瀨', '瀬'),
    ('髮', '髪'),
    ('龍', '竜'),
    ('條', '条'),
    ('實', '実'),
    ('藏', '蔵'),
    ('會', '会'),
    ('學', '学'),
    ('與', '与'),
    ('萬', '万'),
    ('壽', '寿'),
    ('寳', '宝'),
    ('寶', '宝'),
    ('峯', '峰'),
    ('淵', '渕'),
    ('渊', '渕'),
    ('舘', '館'),
    ('栁', '柳'),
    ('桒', '桑'),
    ('黑', '黒'),
    ('曾', '曽'),
    ('增', '増'),
    ('豐', '豊'),
    ('禮', '礼'),
    ('顯', '顕'),
    ('鐵', '鉄'),
    ('榮', '栄'),
    ('營', '営'),
    ('圓', '円'),
    ('邨', '村'),
    ('嶽', '岳'),
    ('晉', '晋'),
    ('傳', '伝'),
    ('縣', '県'),
    ('兒', '児'),
    ('薗', '園'),
    ('檜', '桧'),
    ('藪', '薮'),
    ('莊', '荘'),
    ('淸', '清'),
    ('靜', '静'),
    ('靑', '青'),
    ('恆', '恒'),
    ('戶', '戸'),
    ('穗', '穂'),
    ('聰', '聡'),
    ('亞', '亜'),
    ('佛', '仏'),
    ('來', '来'),
    ('兩', '両'),
    ('乘', '乗'),
    ('龜', '亀'),
    ('關', '関'),
    ('凜', '凛'),
    ('絲', '糸'),
    ('澁', '渋'),
    ('瀧', '滝'),
    ('將', '将'),
    ('樂', '楽'),
    ('濟', '済'),
    ('爲', '為'),
    ('發', '発'),
    ('驛', '駅'),
    ('之', 'ノ'),        // 一之瀬 / 一ノ瀬 / 一の瀬
    ('\u{20BB7}', '吉'), // 𠮷 (つちよし)
    ('\u{2123D}', '土'), // 𡈽
    ('\u{2363A}', '橋'), // 𣘺
    ('\u{FA10}', '塚'),
    ('槗', '橋'),
    ('淺', '浅'),
    ('舩', '船'),
    ('冝', '宜'),
    ('曻', '昇'),
    ('礒', '磯'),
    ('穐', '秋'),
    ('龝', '秋'),
    ('薰', '薫'),
    ('鷗', '鴎'),
    ('遙', '遥'),
    ('瑤', '瑶'),
    ('堯', '尭'),
    ('巖', '巌'),
    ('巢', '巣'),
    ('壯', '壮'),
    ('黃', '黄'),
    ('步', '歩'),
    ('涉', '渉'),
    ('賴', '頼'),
    ('滿', '満'),
    ('當', '当'),
    ('勳', '勲'),
    ('勵', '励'),
    ('儉', '倹'),
    ('劍', '剣'),
    ('曉', '暁'),
    ('檢', '検'),
    ('氣', '気'),
    ('廸', '迪'),
    ('寬', '寛'),
    ('鄕', '郷'),
    ('郞', '郎'),
];

fn variant(c: char) -> char {
    VARIANTS
        .iter()
        .find(|(v, _)| *v == c)
        .map_or(c, |(_, canon)| *canon)
}

fn is_dropped(c: char) -> bool {
    c.is_whitespace()
        || matches!(c, '\u{FE00}'..='\u{FE0F}' | '\u{E0100}'..='\u{E01EF}' | '\u{200B}'..='\u{200D}' | '\u{FEFF}')
        || matches!(
            c,
            '・' | '･' | '.' | ',' | '、' | '。' | '\'' | '"' | '＝' | '='
        )
}

/// Hiragana -> katakana, small -> large, the old / voiced duplicates -> one form.
fn kana(c: char) -> char {
    let c = match c {
        '\u{3041}'..='\u{3096}' => char::from_u32(c as u32 + 0x60).unwrap_or(c),
        _ => c,
    };
    match c {
        'ァ' => 'ア',
        'ィ' => 'イ',
        'ゥ' => 'ウ',
        'ェ' => 'エ',
        'ォ' => 'オ',
        'ッ' => 'ツ',
        'ャ' => 'ヤ',
        'ュ' => 'ユ',
        'ョ' => 'ヨ',
        'ヮ' => 'ワ',
        'ヵ' => 'カ',
        'ヶ' => 'ケ',
        'ヂ' => 'ジ',
        'ヅ' => 'ズ',
        'ヲ' => 'オ',
        'ヴ' => 'ブ',
        'ヰ' => 'イ',
        'ヱ' => 'エ',
        '〜' | '～' | '－' | '-' | '―' | '‐' | '—' | '–' | '−' => 'ー',
        other => other,
    }
}

/// The vowel (a i u e o) a katakana ends with, if it is a mora with one.
fn vowel(c: char) -> Option<char> {
    const A: &str = "アカガサザタダナハバパマヤラワ";
    const I: &str = "イキギシジチニヒビピミリ";
    const U: &str = "ウクグスズツヌフブプムユル";
    const E: &str = "エケゲセゼテデネヘベペメレ";
    const O: &str = "オコゴソゾトドノホボポモヨロ";
    [('a', A), ('i', I), ('u', U), ('e', E), ('o', O)]
        .iter()
        .find(|(_, set)| set.contains(c))
        .map(|(v, _)| *v)
}

/// Folds long vowels: ー dropped, and a vowel kana extending the previous mora's vowel
/// (オウ/オオ, ウウ, エイ/エエ, アア, イイ) dropped, so コウ, コオ, コー and コ compare equal.
fn fold_long_vowels(s: &[char]) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    let mut prev: Option<char> = None;
    for &c in s {
        if c == 'ー' {
            continue;
        }
        let extends = matches!(
            (prev.and_then(vowel), c),
            (Some('o'), 'ウ' | 'オ')
                | (Some('u'), 'ウ')
                | (Some('e'), 'イ' | 'エ')
                | (Some('a'), 'ア')
                | (Some('i'), 'イ')
        );
        if extends {
            continue;
        }
        out.push(c);
        prev = Some(c);
    }
    out
}

/// Width fold (NFKC), variants, kana fold; spaces and dots kept out. Shared by names and
/// addresses.
fn fold_chars(s: &str) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len());
    let mut it = s.nfkc().filter(|c| !is_dropped(*c)).peekable();
    while let Some(c) = it.next() {
        // ヴァ ヴィ ヴェ ヴォ are read バ ビ ベ ボ.
        if matches!(c, 'ヴ' | 'ゔ') {
            let voiced = match it.peek() {
                Some('ァ' | 'ぁ') => Some('バ'),
                Some('ィ' | 'ぃ') => Some('ビ'),
                Some('ェ' | 'ぇ') => Some('ベ'),
                Some('ォ' | 'ぉ') => Some('ボ'),
                _ => None,
            };
            if let Some(v) = voiced {
                it.next();
                out.push(v);
                continue;
            }
        }
        out.push(kana(variant(c.to_ascii_lowercase())));
    }
    out
}

/// A name (kanji or kana) folded for comparison; `None` when nothing is left.
pub fn name(s: &str) -> Option<String> {
    let chars = fold_chars(s);
    let out = fold_long_vowels(&chars);
    (!out.is_empty()).then_some(out)
}

/// Splits an unsplit name ("山田 太郎" in one field) at its first space, if it has one.
pub fn split_name(s: &str) -> Option<(String, String)> {
    let t = s.trim();
    let at = t.find(|c: char| c.is_whitespace())?;
    let (family, rest) = t.split_at(at);
    let given = rest.trim();
    (!family.is_empty() && !given.is_empty()).then(|| (family.to_string(), given.to_string()))
}

/// Only the ASCII digits of a value (after width folding); `None` when there are none.
pub fn digits(s: &str) -> Option<String> {
    let d: String = s.nfkc().filter(char::is_ascii_digit).collect();
    (!d.is_empty()).then_some(d)
}

/// A phone number as digits, a +81 country prefix turned back into the trunk 0.
pub fn phone(s: &str) -> Option<String> {
    let d = digits(s)?;
    let d = match d.strip_prefix("81") {
        Some(rest) if d.len() >= 11 && !rest.starts_with('0') => format!("0{rest}"),
        _ => d,
    };
    (d.len() >= 6).then_some(d)
}

/// A postal code: exactly 7 digits.
pub fn postal(s: &str) -> Option<u32> {
    let d = digits(s)?;
    if d.len() == 7 { d.parse().ok() } else { None }
}

/// Sex to one code: 1 male, 2 female; unknown / other / unparsable -> `None` (not compared).
pub fn sex(s: &str) -> Option<u8> {
    // Inner spaces separate numbers (1980-01-02 00:00), they never join them.
    let t: String = s
        .trim()
        .nfkc()
        .map(|c| if c.is_whitespace() { '/' } else { c })
        .collect::<String>()
        .to_lowercase();
    match t.as_str() {
        "m" | "1" | "男" | "男性" | "male" | "man" => Some(1),
        "f" | "2" | "女" | "女性" | "female" | "woman" | "w" => Some(2),
        _ => None,
    }
}

/// A generic text value (insurance symbol): folded, spaces removed.
pub fn token(s: &str) -> Option<String> {
    let out: String = fold_chars(s).into_iter().filter(|c| *c != 'ー').collect();
    (!out.is_empty()).then_some(out)
}

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Date {
    pub year: u16,
    pub month: u8,
    pub day: u8,
}

fn era_start(e: char) -> Option<u16> {
    match e {
        'm' | '明' | '1' => Some(1867),
        't' | '大' | '2' => Some(1911),
        's' | '昭' | '3' => Some(1925),
        'h' | '平' | '4' => Some(1988),
        'r' | '令' | '5' => Some(2018),
        _ => None,
    }
}

fn checked(year: u32, month: u32, day: u32) -> Option<Date> {
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if !(1850..=2200).contains(&year) || day == 0 || day > days {
        return None;
    }
    Some(Date {
        year: u16::try_from(year).ok()?,
        month: u8::try_from(month).ok()?,
        day: u8::try_from(day).ok()?,
    })
}

/// Splits "55.1.2" / "55年1月2日" / "1980-01-02" into its number groups.
fn number_groups(s: &str) -> Vec<u32> {
    let mut groups = Vec::new();
    let mut cur: Option<u32> = None;
    for c in s.chars() {
        if let Some(d) = c.to_digit(10) {
            cur = Some(cur.unwrap_or(0).saturating_mul(10).saturating_add(d));
        } else if c == '元' {
            cur = Some(1);
        } else if let Some(v) = cur.take() {
            groups.push(v);
        }
    }
    if let Some(v) = cur {
        groups.push(v);
    }
    groups
}

fn digit_value(s: &str) -> Option<u32> {
    s.parse().ok()
}

/// A birth date in any of the western or Japanese-era forms; `None` if it is not a date.
pub fn date(s: &str) -> Option<Date> {
    // Inner spaces separate numbers (1980-01-02 00:00), they never join them.
    let t: String = s
        .trim()
        .nfkc()
        .map(|c| if c.is_whitespace() { '/' } else { c })
        .collect::<String>()
        .to_lowercase();
    let t = t.trim_end_matches(['生', 'ま', 'れ']);
    let first = t.chars().next()?;
    // Era written out or abbreviated: 昭和55年1月2日, S55.1.2, s550102, 平成元年...
    let (era, rest): (Option<char>, &str) = if let Some((e, r)) =
        ["明治", "大正", "昭和", "平成", "令和"]
            .iter()
            .find_map(|e| t.strip_prefix(e).map(|r| (*e, r)))
    {
        (e.chars().next(), r)
    } else if first.is_ascii_alphabetic() || matches!(first, '明' | '大' | '昭' | '平' | '令')
    {
        // S55.1.2, s550102, 昭55.1.2
        (Some(first), t.get(first.len_utf8()..).unwrap_or(""))
    } else {
        (None, t)
    };
    if let Some(code) = era {
        let start = u32::from(era_start(code)?);
        let rest = rest.trim_start_matches(['.', '/', '-']);
        let all_digits = !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit());
        let (y, m, d) = if all_digits && rest.len() == 6 {
            (
                digit_value(rest.get(0..2)?)?,
                digit_value(rest.get(2..4)?)?,
                digit_value(rest.get(4..6)?)?,
            )
        } else {
            match number_groups(rest).as_slice() {
                [y, m, d] => (*y, *m, *d),
                _ => return None,
            }
        };
        if y == 0 {
            return None;
        }
        return checked(start.saturating_add(y), m, d);
    }
    let all_digits = t.chars().all(|c| c.is_ascii_digit());
    if all_digits && t.len() == 8 {
        return checked(
            digit_value(t.get(0..4)?)?,
            digit_value(t.get(4..6)?)?,
            digit_value(t.get(6..8)?)?,
        );
    }
    if all_digits && t.len() == 7 {
        // The era-coded form of Japanese systems: 1=明治 2=大正 3=昭和 4=平成 5=令和.
        let start = u32::from(era_start(first)?);
        let y = digit_value(t.get(1..3)?)?;
        if y == 0 {
            return None;
        }
        return checked(
            start.saturating_add(y),
            digit_value(t.get(3..5)?)?,
            digit_value(t.get(5..7)?)?,
        );
    }
    match number_groups(t).as_slice() {
        // 1980-01-02, 1980/1/2, 1980年1月2日; a time after the date (1980-01-02T00:00) ignored.
        [y, m, d, ..] if *y >= 1000 => checked(*y, *m, *d),
        // Day first (02/01/1980) is not a Japanese form; month/day/year is refused too.
        _ => None,
    }
}

/// An address reduced to what identifies a dwelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The prefecture-less municipality and town name (e.g. `横浜市中区山下町`).
    pub town: Box<str>,
    /// The 丁目/番地/号 numbers in order.
    pub blocks: Box<[u32]>,
}

const PREFECTURE_ENDS: [char; 3] = ['都', '府', '県'];

fn kanji_digit(c: char) -> Option<u32> {
    "〇一二三四五六七八九"
        .chars()
        .position(|k| k == c)
        .and_then(|p| u32::try_from(p).ok())
}

fn is_kanji_numeral(c: char) -> bool {
    kanji_digit(c).is_some() || matches!(c, '十' | '百' | '千')
}

/// Value of a run of kanji numerals: 二十三 -> 23, 百五 -> 105, 一〇三 -> 103.
fn kanji_number(run: &[char]) -> u32 {
    let positional = !run.iter().any(|c| matches!(c, '十' | '百' | '千'));
    if positional {
        return run
            .iter()
            .filter_map(|c| kanji_digit(*c))
            .fold(0u32, |acc, d| acc.saturating_mul(10).saturating_add(d));
    }
    let (mut total, mut cur) = (0u32, 0u32);
    for c in run {
        match c {
            '十' | '百' | '千' => {
                let unit = match c {
                    '十' => 10,
                    '百' => 100,
                    _ => 1000,
                };
                total = total.saturating_add(if cur == 0 { 1 } else { cur }.saturating_mul(unit));
                cur = 0;
            }
            d => cur = kanji_digit(*d).unwrap_or(0),
        }
    }
    total.saturating_add(cur)
}

fn is_block_marker(rest: &[char]) -> Option<usize> {
    for m in ["丁目", "番地", "番", "号", "丁", "ノ", "之", "ー"] {
        let n = m.chars().count();
        if rest.len() >= n && rest.iter().zip(m.chars()).all(|(a, b)| *a == b) {
            return Some(n);
        }
    }
    None
}

/// An address: `None` when nothing is left after folding.
pub fn address(s: &str) -> Option<Address> {
    let mut chars: Vec<char> = fold_chars(s)
        .into_iter()
        .map(|c| if matches!(c, 'ケ' | 'ガ') { 'ケ' } else { c })
        .collect();
    // A postal code written first (〒160-0023 ...) is not part of the address.
    if chars.first() == Some(&'〒') {
        let n = chars
            .iter()
            .skip(1)
            .take_while(|c| c.is_ascii_digit() || **c == 'ー')
            .count();
        chars.drain(..=n);
    }
    // 大字 (a rural address prefix some systems keep and others drop).
    let mut i = 0;
    while i + 1 < chars.len() {
        if chars.get(i) == Some(&'大') && chars.get(i + 1) == Some(&'字') {
            chars.drain(i..i + 2);
        } else {
            i += 1;
        }
    }
    // Drop the prefecture (北海道, 東京都, 大阪府, 神奈川県...) at the start.
    if chars.starts_with(&['北', '海', '道']) {
        chars.drain(..3);
    } else if let Some(p) = chars
        .iter()
        .take(4)
        .position(|c| PREFECTURE_ENDS.contains(c))
        && p >= 2
    {
        chars.drain(..=p);
    }
    // Kanji numerals -> digits where they are block numbers (before a marker or after one).
    let mut out: Vec<char> = Vec::with_capacity(chars.len());
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        if is_kanji_numeral(c) {
            let start = i;
            while chars.get(i).is_some_and(|c| is_kanji_numeral(*c)) {
                i += 1;
            }
            let run = chars.get(start..i).unwrap_or(&[]);
            let after = chars.get(i..).unwrap_or(&[]);
            let before_is_sep = out.last().is_some_and(|c| *c == '-' || c.is_ascii_digit());
            if before_is_sep || after.is_empty() || is_block_marker(after).is_some() {
                out.extend(kanji_number(run).to_string().chars());
            } else {
                out.extend(run.iter());
            }
            continue;
        }
        if out.last().is_some_and(char::is_ascii_digit)
            && let Some(n) = chars.get(i..).and_then(is_block_marker)
        {
            out.push('-');
            i += n;
            continue;
        }
        out.push(c);
        i += 1;
    }
    // Town = up to the first digit; blocks = digit groups joined by '-'; then the tail.
    let first_digit = out
        .iter()
        .position(char::is_ascii_digit)
        .unwrap_or(out.len());
    let town: String = out.get(..first_digit).unwrap_or(&[]).iter().collect();
    let mut blocks = Vec::new();
    let mut cur: Option<u32> = None;
    for c in out.get(first_digit..).unwrap_or(&[]) {
        if let Some(d) = c.to_digit(10) {
            cur = Some(cur.unwrap_or(0).saturating_mul(10).saturating_add(d));
        } else if *c == '-' {
            if let Some(v) = cur.take() {
                blocks.push(v);
            }
        } else {
            break; // building / room tail
        }
    }
    if let Some(v) = cur {
        blocks.push(v);
    }
    if town.is_empty() && blocks.is_empty() {
        return None;
    }
    Some(Address {
        town: town.into_boxed_str(),
        blocks: blocks.into_boxed_slice(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kanji_variants_fold_including_non_bmp_compat_and_ivs() {
        assert_eq!(name("髙橋"), name("高橋"));
        assert_eq!(name("山\u{FA11}"), name("山崎"));
        assert_eq!(name("\u{20BB7}田"), name("吉田"));
        assert_eq!(name("渡邊"), name("渡辺"));
        assert_eq!(name("渡邉"), name("渡辺"));
        assert_eq!(name("齋藤"), name("斉藤"));
        assert_eq!(name("濱田"), name("浜田"));
        assert_eq!(name("櫻井"), name("桜井"));
        assert_eq!(name("槗本"), name("橋本"));
        assert_eq!(name("太郞"), name("太郎"));
        // IVS selector dropped.
        assert_eq!(name("葛\u{E0100}西"), name("葛西"));
        // Compatibility ideograph 塚 U+FA10 and 神 U+FA19 via decomposition.
        assert_eq!(name("\u{FA19}田"), name("神田"));
        assert_eq!(name("大\u{FA10}"), name("大塚"));
    }

    #[test]
    fn kana_forms_fold() {
        assert_eq!(name("やまだ"), name("ヤマダ"));
        assert_eq!(name("ﾔﾏﾀﾞ"), name("ヤマダ"));
        assert_eq!(name("ｶﾞｯﾂ"), name("ガツツ"));
        assert_eq!(name("ﾊﾟﾝ"), name("パン"));
        assert_eq!(name("キョウコ"), name("キヨウコ"));
        assert_eq!(name("サトウ"), name("サトー"));
        assert_eq!(name("サトウ"), name("サトオ"));
        assert_eq!(name("オオノ"), name("オーノ"));
        assert_eq!(name("ユウコ"), name("ユーコ"));
        assert_eq!(name("ケイコ"), name("ケーコ"));
        assert_eq!(name("チヂワ"), name("チジワ"));
        assert_eq!(name("ヴェルデ"), name("ベルデ"));
        assert_eq!(name("山田　太郎"), name("山田太郎"));
        assert_eq!(name("一之瀬"), name("一の瀬"));
        assert_eq!(name("一ノ瀬"), name("一の瀬"));
        assert_eq!(name("ＡＢＣ"), name("abc"));
        assert_ne!(name("サトウ"), name("カトウ"));
        assert_eq!(name("  \u{3000} "), None);
    }

    #[test]
    fn dates_in_western_and_era_forms() {
        let d = Some(Date {
            year: 1980,
            month: 1,
            day: 2,
        });
        for s in [
            "1980-01-02",
            "1980/1/2",
            "19800102",
            "1980年1月2日",
            "１９８０－０１－０２",
            "昭和55年1月2日",
            "S55.1.2",
            "S55/01/02",
            "s550102",
            "3550102",
            "昭和５５年１月２日",
            "昭55.1.2",
            "S.55.1.2",
            "昭和55年01月02日生",
            "1980.1.2",
            "1980-01-02T00:00:00",
            "1980-01-02 00:00",
        ] {
            assert_eq!(date(s), d, "{s}");
        }
        assert_eq!(
            date("平成元年1月8日"),
            Some(Date {
                year: 1989,
                month: 1,
                day: 8
            })
        );
        assert_eq!(
            date("H2.3.4"),
            Some(Date {
                year: 1990,
                month: 3,
                day: 4
            })
        );
        assert_eq!(
            date("R1.5.1"),
            Some(Date {
                year: 2019,
                month: 5,
                day: 1
            })
        );
        assert_eq!(
            date("T10.1.1"),
            Some(Date {
                year: 1921,
                month: 1,
                day: 1
            })
        );
        assert_eq!(
            date("M45.7.1"),
            Some(Date {
                year: 1912,
                month: 7,
                day: 1
            })
        );
        assert_eq!(date("1980-02-30"), None);
        assert_eq!(date("X55.1.2"), None);
        assert_eq!(date(""), None);
        assert_eq!(date("昭和"), None);
        assert_eq!(date("9999999999999999999999"), None);
    }

    #[test]
    fn address_notations_fold() {
        let a = address("東京都新宿区西新宿二丁目8番1号").unwrap();
        assert_eq!(&*a.town, "新宿区西新宿");
        assert_eq!(&*a.blocks, &[2, 8, 1]);
        for s in [
            "新宿区西新宿2-8-1",
            "新宿区西新宿２－８－１",
            "東京都新宿区西新宿2丁目8-1 都庁ビル101",
            "新宿区西新宿2‐8‐1",
            "新宿区西新宿2ー8ー1",
            "新宿区西新宿2の8の1",
            "新宿区西新宿二丁目八番地一",
        ] {
            assert_eq!(address(s), Some(a.clone()), "{s}");
        }
        assert_eq!(
            address("〒160-0023 東京都新宿区西新宿2-8-1"),
            Some(a.clone())
        );
        assert_eq!(
            address("茨城県つくば市大字上ノ室123"),
            address("つくば市上ノ室123")
        );
        let b = address("神奈川県横浜市中区山下町二十三番地").unwrap();
        assert_eq!(&*b.blocks, &[23]);
        assert_eq!(&*b.town, "横浜市中区山下町");
        // A place name with a kanji numeral keeps it.
        assert_eq!(
            &*address("三重県四日市市諏訪町1-5").unwrap().town,
            "四日市市諏訪町"
        );
    }

    #[test]
    fn phones_postal_sex() {
        assert_eq!(phone("03-1234-5678"), Some("0312345678".into()));
        assert_eq!(phone("(03)1234-5678"), Some("0312345678".into()));
        assert_eq!(phone("+81 90 1234 5678"), Some("09012345678".into()));
        assert_eq!(phone("１２"), None);
        assert_eq!(postal("〒160-0023"), Some(1600023));
        assert_eq!(postal("160"), None);
        assert_eq!(sex("男"), Some(1));
        assert_eq!(sex("F"), Some(2));
        assert_eq!(sex("2"), Some(2));
        assert_eq!(sex("U"), None);
    }
}
