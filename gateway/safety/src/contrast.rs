//! The contrast-agent table: which allergens, as a hospital names them, are iodinated or
//! gadolinium contrast agents. This is the one place the mapping lives.
//!
//! # How an allergen is matched
//!
//! The allergen's text (IAM-3.2 / AL1-3.2) and then its code (IAM-3.1 / AL1-3.1: many
//! senders put a mnemonic such as `IOHEXOL` there) are folded with the identity matcher's
//! folding ([`gateway_identity::normalize::name`]: NFKC, so full- and half-width forms
//! are one; ASCII lower case; hiragana to katakana; long vowels, spaces and middle dots
//! dropped) and searched for each folded entry below; the first entry found decides. Then
//! the generic words: a text that says contrast (`contrast`, `造影`) and iodine (`iod`,
//! `ヨード`, `ヨウ素`) is iodinated, contrast and gadolinium (`gado`, `ガド`) is
//! gadolinium, contrast alone is [`Contrast::Unspecified`] (a radiologist would rather be
//! warned of a contrast reaction whose agent is unknown: its warning carries no class).
//!
//! [`recognise`] answers that; [`classify`] answers the class only (`None` for an
//! unspecified contrast agent as for a non-contrast allergen).
//!
//! No drug-code table (YJ, RxNorm) is listed: a code is only ever matched as text, since
//! no code list could be verified against its publisher when this table was written.
//! Codes are to be added here only with their source named.
//!
//! # Iodinated contrast media (CT, angiography, urography)
//!
//! | ingredient | names matched |
//! |---|---|
//! | iohexol | iohexol, イオヘキソール, Omnipaque, オムニパーク |
//! | iopamidol | iopamidol, イオパミドール, Iopamiron, イオパミロン, Isovue |
//! | iomeprol | iomeprol, イオメプロール, Iomeron, イオメロン |
//! | ioversol | ioversol, イオベルソール, Optiray, オプチレイ |
//! | iopromide | iopromide, イオプロミド, Proscope, プロスコープ, Ultravist |
//! | iodixanol | iodixanol, イオジキサノール, Visipaque, ビジパーク |
//! | iobitridol | iobitridol, イオビトリドール, Xenetix |
//! | ioxilan | ioxilan, イオキシラン, Oxilan |
//! | diatrizoate (amidotrizoate) | diatrizoate, amidotrizoate, アミドトリゾ酸, Urografin, ウログラフイン, Gastrografin, ガストログラフイン |
//! | ioxaglate | ioxaglate, イオキサグル酸, Hexabrix, ヘキサブリックス |
//! | (a Japanese brand) | イオベリン |
//!
//! # Gadolinium-based contrast agents (MR)
//!
//! | ingredient | names matched |
//! |---|---|
//! | gadoterate | gadoterate, ガドテル酸, Magnescope, マグネスコープ, Dotarem |
//! | gadobutrol | gadobutrol, ガドブトロール, Gadovist, ガドビスト |
//! | gadoteridol | gadoteridol, ガドテリドール, ProHance, プロハンス |
//! | gadoxetate | gadoxetate, ガドキセト酸, EOB・プリモビスト, Primovist, プリモビスト |
//! | gadopentetate | gadopentetate, ガドペンテト酸, Magnevist, マグネビスト |
//! | gadodiamide | gadodiamide, ガドジアミド, Omniscan, オムニスキャン |
//! | any other gadolinium agent | gado (every INN of the class begins so), ガド, gadolinium, ガドリニウム |
//!
//! Not contrast: anything else (penicillin, egg, latex, iodine tincture without the word
//! contrast, ...). Barium sulfate is an X-ray contrast medium but neither iodinated nor
//! gadolinium and is deliberately not matched.

use gateway_booking::ContrastClass;
use gateway_identity::normalize;
use serde::{Deserialize, Serialize};

use ContrastClass::{Gadolinium as G, Iodinated as I};

/// Every agent name and its class (matched folded, as a substring; see the module docs).
pub const TABLE: &[(&str, ContrastClass)] = &[
    // iohexol
    ("iohexol", I),
    ("イオヘキソール", I),
    ("omnipaque", I),
    ("オムニパーク", I),
    // iopamidol
    ("iopamidol", I),
    ("イオパミドール", I),
    ("iopamiron", I),
    ("イオパミロン", I),
    ("isovue", I),
    // iomeprol
    ("iomeprol", I),
    ("イオメプロール", I),
    ("iomeron", I),
    ("イオメロン", I),
    // ioversol
    ("ioversol", I),
    ("イオベルソール", I),
    ("optiray", I),
    ("オプチレイ", I),
    // iopromide
    ("iopromide", I),
    ("イオプロミド", I),
    ("proscope", I),
    ("プロスコープ", I),
    ("ultravist", I),
    // iodixanol
    ("iodixanol", I),
    ("イオジキサノール", I),
    ("visipaque", I),
    ("ビジパーク", I),
    // iobitridol
    ("iobitridol", I),
    ("イオビトリドール", I),
    ("xenetix", I),
    // ioxilan
    ("ioxilan", I),
    ("イオキシラン", I),
    ("oxilan", I),
    // diatrizoate / amidotrizoate
    ("diatrizoate", I),
    ("amidotrizoate", I),
    ("アミドトリゾ酸", I),
    ("urografin", I),
    ("ウログラフイン", I),
    ("gastrografin", I),
    ("ガストログラフイン", I),
    // ioxaglate
    ("ioxaglate", I),
    ("イオキサグル酸", I),
    ("hexabrix", I),
    ("ヘキサブリックス", I),
    // a Japanese brand
    ("イオベリン", I),
    // gadoterate
    ("gadoterate", G),
    ("ガドテル酸", G),
    ("magnescope", G),
    ("マグネスコープ", G),
    ("dotarem", G),
    // gadobutrol
    ("gadobutrol", G),
    ("ガドブトロール", G),
    ("gadovist", G),
    ("ガドビスト", G),
    // gadoteridol
    ("gadoteridol", G),
    ("ガドテリドール", G),
    ("prohance", G),
    ("プロハンス", G),
    // gadoxetate
    ("gadoxetate", G),
    ("ガドキセト酸", G),
    ("primovist", G),
    ("プリモビスト", G),
    // gadopentetate
    ("gadopentetate", G),
    ("ガドペンテト酸", G),
    ("magnevist", G),
    ("マグネビスト", G),
    // gadodiamide
    ("gadodiamide", G),
    ("ガドジアミド", G),
    ("omniscan", G),
    ("オムニスキャン", G),
    // the class
    ("gadolinium", G),
    ("ガドリニウム", G),
    ("gado", G),
    ("ガド", G),
];

/// Words that say "contrast agent" (folded as a substring).
const CONTRAST: &[&str] = &["contrast", "造影"];
/// Words that say "iodine".
const IODINE: &[&str] = &["iod", "ヨード", "ヨウ素", "ヨウソ"];

/// A contrast agent as recognised: its class, or a contrast agent of no named class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Contrast {
    Class(ContrastClass),
    /// The sender said contrast (`造影剤`, `contrast`) without saying which.
    Unspecified,
}

impl Contrast {
    /// The class, when named.
    pub fn class(self) -> Option<ContrastClass> {
        match self {
            Self::Class(c) => Some(c),
            Self::Unspecified => None,
        }
    }

    /// English name.
    pub fn en(self) -> &'static str {
        match self {
            Self::Class(c) => c.en(),
            Self::Unspecified => "contrast agent (class not given)",
        }
    }

    /// Japanese name.
    pub fn ja(self) -> &'static str {
        match self {
            Self::Class(c) => c.ja(),
            Self::Unspecified => "造影剤 (種類不明)",
        }
    }
}

/// The class of an allergen given its code and text as sent, if it is a contrast agent of
/// a named class (see [`recognise`] for every contrast agent).
pub fn classify(code: Option<&str>, text: Option<&str>) -> Option<ContrastClass> {
    recognise(code, text).and_then(Contrast::class)
}

/// Whether an allergen given its code and text as sent is a contrast agent, and which.
pub fn recognise(code: Option<&str>, text: Option<&str>) -> Option<Contrast> {
    let folded: Vec<String> = [text, code]
        .into_iter()
        .flatten()
        .filter_map(normalize::name)
        .collect();
    if folded.is_empty() {
        return None;
    }
    let has = |needle: &str| {
        normalize::name(needle).is_some_and(|n| folded.iter().any(|f| f.contains(&n)))
    };
    if let Some((_, class)) = TABLE.iter().find(|(name, _)| has(name)) {
        return Some(Contrast::Class(*class));
    }
    if CONTRAST.iter().any(|w| has(w)) {
        return Some(if IODINE.iter().any(|w| has(w)) {
            Contrast::Class(I)
        } else {
            Contrast::Unspecified
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_entry_classifies_as_its_class_alone_and_in_a_phrase() {
        for (name, class) in TABLE {
            assert_eq!(classify(None, Some(name)), Some(*class), "{name}");
            let phrase = format!("reaction to {name} 2019");
            assert_eq!(classify(None, Some(&phrase)), Some(*class), "{phrase}");
            assert_eq!(classify(Some(name), None), Some(*class), "code {name}");
        }
    }

    #[test]
    fn width_case_and_kana_forms_fold_together() {
        for (s, class) in [
            ("OMNIPAQUE 300", I),
            ("ＯＭＮＩＰＡＱＵＥ", I),
            ("ｵﾑﾆﾊﾟｰｸ", I),
            ("おむにぱーく", I),
            ("オムニパク", I),
            ("イオパミロン注370", I),
            ("EOB・プリモビスト", G),
            ("ＥＯＢプリモビスト", G),
            ("Gadovist 1.0", G),
            ("ﾏｸﾞﾈｽｺｰﾌﾟ", G),
            ("ProHance", G),
        ] {
            assert_eq!(classify(None, Some(s)), Some(class), "{s}");
        }
    }

    #[test]
    fn generic_words_give_the_class_or_unspecified() {
        for (s, class) in [
            ("iodinated contrast", I),
            ("Iodine contrast media", I),
            ("ヨード造影剤", I),
            ("造影剤 ヨード", I),
            ("ヨード系造影剤", I),
            ("gadolinium contrast", G),
            ("ガドリニウム造影剤", G),
        ] {
            assert_eq!(classify(None, Some(s)), Some(class), "{s}");
            assert_eq!(
                recognise(None, Some(s)),
                Some(Contrast::Class(class)),
                "{s}"
            );
        }
        for s in ["造影剤", "contrast medium", "CT造影剤"] {
            assert_eq!(recognise(None, Some(s)), Some(Contrast::Unspecified), "{s}");
            assert_eq!(classify(None, Some(s)), None, "{s}");
        }
        assert_eq!(Contrast::Unspecified.ja(), "造影剤 (種類不明)");
    }

    #[test]
    fn other_allergens_are_not_contrast() {
        for s in [
            "penicillin",
            "ペニシリン",
            "egg",
            "卵",
            "latex",
            "ラテックス",
            "iodine tincture",
            "barium sulfate",
            "バリウム",
            "cefazolin",
            "",
        ] {
            assert_eq!(recognise(None, Some(s)), None, "{s}");
            assert_eq!(recognise(Some(s), Some("")), None, "code {s}");
        }
        assert_eq!(recognise(None, None), None);
    }

    #[test]
    fn the_text_is_read_before_the_code_and_a_code_mnemonic_is_matched() {
        assert_eq!(classify(Some("IOHEXOL"), Some("")), Some(I));
        assert_eq!(
            recognise(Some("1100001"), Some("造影剤")),
            Some(Contrast::Unspecified)
        );
        assert_eq!(classify(Some("GADO1"), Some("オムニパーク")), Some(I));
    }
}
