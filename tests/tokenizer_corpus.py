"""Strings on which sdcore's tokenizer must give exactly transformers' CLIPTokenizer ids.

Grouped by what they exercise; invisible characters are written as escapes so the file reads plainly.
"""

SD_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of A Cat",
    "portrait of a woman, oil painting, by greg rutkowski, trending on artstation",
    "(masterpiece:1.2), best quality, (ultra detailed:1.4), 1girl, solo",
    "((masterpiece)), (((best quality))), [[lowres]]",
    "a (red:1.5) sports car, [blue:0.8] sky",
    "[cat:dog:0.5] in a field",
    "<lora:detail_tweaker:0.7> a castle on a hill",
    "a cat BREAK a dog",
    "embedding:easynegative, bad hands, extra fingers",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, cropped, worst quality, jpeg artifacts",
    "cyberpunk city at night, neon lights, rain, 8k, octane render, unreal engine 5",
    "a watercolor painting of a fox, by studio ghibli",
    "photorealistic, hdr, 4k uhd, 35mm, f/1.8, bokeh",
    "an isometric 3d render of a tiny island | low poly | blender",
    "{red|green|blue} balloon",
    "a dog's toy, the cats' bowl",
    "mona lisa,smiling,sfumato,leonardo da vinci",
    "close-up of a bee on a sunflower; macro photography",
    "steampunk owl wearing goggles -- ar 16:9",
    "a bowl of ramen --no chopsticks",
    "logo for 'Acme Corp', vector art, flat design",
    "anime girl, blue hair, school uniform, cherry blossoms, spring",
    "a RAW photo of a 25-year-old man, dslr, soft lighting, high quality, film grain, Fujifilm XT3",
    "old man with a beard :: 2 | young boy :: -0.5",
    "surreal landscape by Salvador Dalí and René Magritte",
    "Pokémon-style creature, Ghibli-esque, Moebius",
    "food photography: crème brûlée, café au lait, jalapeño",
    "a sign that says \"OPEN 24/7\"",
    "a man in a suit & tie",
    "a ship in a bottle... on a shelf!!!",
    "masterpiece,best quality,ultra-detailed,illustration,1girl,solo,long hair,looking at viewer",
    "(worst quality, low quality:1.4), (monochrome:1.1), watermark, signature",
    "Studio Portrait of Dr. Jane Doe, Ph.D., M.D.",
    "view from above, 1920x1080, 16:9 aspect ratio, v1.5, sd1.5",
]

CONTRACTIONS_AND_APOSTROPHES = [
    "it's", "IT'S", "It'S", "we're", "they've", "I'm", "you'll", "he'd", "don't", "can't", "won't",
    "'s", "''s", "'''s", "'s'", "s'", "rock'n'roll", "o'clock", "the 90's", "'tis", "y'all'd've",
    "it’s", "don’t", "l'été", "'ll'll'll",
]

PUNCTUATION = [
    "!", "!!!", "...", "?!?!", "((((masterpiece))))", "[[[cat]]]", "{a|b|c}", "----", "~~~", "@#$%^&*",
    "'''", "\"\"\"", "<>", "</w>", "cat</w>", "a</w>b", "#hashtag @mention", "https://example.com/a?b=c&d=e",
    "user@example.com", "C:\\path\\to\\file.png", "a_b_c", "snake_case and kebab-case", "==>", "-->",
    "..!..?..", "(*_*)", "¯\\_(ツ)_/¯", "•·°±×÷", "—–‐‑", "…", "§¶†‡", "«»‹›", "„“”‚‘’", "¿¡",
]

NUMBERS = [
    "1", "0", "1234567890", "3.14159", "-42", "1e10", "1,000,000", "$19.99", "50%", "4k 8k 16k",
    "1920x1080", "2024-01-01T12:00:00Z", "0x1F", "007", "1st 2nd 3rd 4th", "x²+y³", "½ ¼ ¾", "Ⅻ ⅻ",
    "①②③", "٣٤٥", "३४५", "๓๔๕", "１２３", "𝟏𝟐𝟑", "१०० रुपये", "10k+ likes",
]

UNICODE_TEXT = [
    "café", "cafe\u0301", "e\u0301\u0300\u0327", "Å vs A\u030a vs \u212b", "ΟΔΟΣ ΣΑΣ", "ὈΔΥΣΣΕΎΣ", "σς Σ",
    "İstanbul ıI", "STRASSE straße ẞ", "ﬁ ﬂ ﬀ ﬃ", "Ǆ ǅ ǆ", "Привет, мир!", "ΑΘΗΝΑ Αθήνα",
    "שלום עולם", "مرحبا بالعالم", "مَرْحَبًا", "سلام\u200cدنیا", "नमस्ते दुनिया", "हिन्दी में एक बिल्ली",
    "ক্ষ", "தமிழ்", "สวัสดีครับ", "ຊາດ", "ཀྲུང་གོ", "ሰላም", "Ꭰ Ꭱ Ꭲ", "Tiếng Việt có dấu",
    "一只猫坐在桌子上", "猫の写真、高品質", "고양이 사진", "\u1100\u1161\u11a8", "中文English混合123",
    "ｱｲｳｴｵ ﾊﾟ", "𝐁𝐨𝐥𝐝 𝑰𝒕𝒂𝒍𝒊𝒄 𝔉𝔯𝔞𝔨𝔱𝔲𝔯", "ℌℑℜℨ", "ᴀʙᴄ", "Ω Ω ω", "µ μ", "K K", "ǰ\u0323",
    "a\u0345\u0301", "𐍈 gothic", "𓀀 hieroglyph", "ꙮ", "Ⓐⓑⓒ",
]

EMOJI = [
    "🐱", "🐱🐶🐭", "cat🐱dog", "👍", "👍🏿", "👍🏻👍🏼👍🏽👍🏾👍🏿",
    "🧑🏽\u200d🚀", "👨\u200d👩\u200d👧\u200d👦",
    "🏳\ufe0f\u200d🌈", "🏴\u200d☠\ufe0f", "🇯🇵🇺🇸🇫🇷", "1\ufe0f\u20e3 #\ufe0f\u20e3", "❤\ufe0f ❤",
    "👩🏾\u200d❤\ufe0f\u200d💋\u200d👨🏻", "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    "a photo of 🍕 and 🍔, 4k", "☀️🌙⭐", "🫠🫶🥹", "✌\ufe0e ✌\ufe0f", "©️ ®️ ™️",
]

HTML_ENTITIES = [
    "&amp;", "Tom &amp; Jerry", "&lt;b&gt;bold&lt;/b&gt;", "&#39;quoted&#39;", "&quot;hi&quot;", "a&nbsp;b",
    "&#x1F600;", "&amp;amp;", "&copy; 2024", "&euro;100", "<b>bold</b> <i>it</i>", "&#8217;",
]

MOJIBAKE = [
    "CafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "ðŸ˜€", "Ã©Ã¨Ãª", "donâ€™t", "Â£100", "ï»¿BOM", "\ufffd\ufffd",
    "æ—¥æœ¬èªž", "Ð\x9fÑ\x80Ð¸Ð²ÐµÑ\x82",
]

CONTROL_CHARACTERS = [
    "a\x00b", "bell\x07", "\x1b[31mred\x1b[0m", "del\x7f", "a\x1cb\x1dc\x1ed\x1ff", "a\x85b", "\x80\x9f",
    "line1\r\nline2", "tab\tseparated\tvalues", "a\vb\fc", "\x08backspace", "null\x00\x00\x00",
]

ZERO_WIDTH = [
    "zero\u200bwidth", "zero\u200cnon\u200djoiner", "word\u2060joiner", "\ufeffbom", "soft\u00adhyphen",
    "mongolian\u180evowel", "rtl\u200fmark\u200e", "\u200b\u200b\u200b", "a\u034fb", "in\u2062visible",
]

ODD_WHITESPACE = [
    "a\u00a0b", "a\u2000b\u2001c\u2002d\u2003e", "a\u2004b\u2005c\u2006d\u2007e\u2008f\u2009g\u200ah",
    "a\u2028b\u2029c", "a\u202fb\u205fc", "a\u3000b", "a\u1680b", "   leading", "trailing   ",
    "  many    spaces   between  ", "\n\nnewlines\n\n", "mixed \t\n\r\u00a0\u3000 whitespace",
]

FULLWIDTH_AND_QUOTES = [
    "ｆｕｌｌｗｉｄｔｈ", "ＡＢＣ", "！？", "（ｃａｔ：１．２）", "“curly double”", "‘curly single’",
    "„German“", "«French»", "「日本」『引用』", "it‘s", "〝quote〞",
]

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|startoftext|>", "a<|endoftext|>b", "a <|endoftext|> b", "<|startoftext|>hello",
    "hello<|endoftext|>", "<|startoftext|><|endoftext|>", "<|endoftext|><|endoftext|>", "<|ENDOFTEXT|>",
    "<|EndOfText|>", "<|EndOfText|>>>", "a<|StartOfText|>b", "<| endoftext |>", "<|endoftext|",
    "|endoftext|>", "<<|endoftext|>>", "&lt;|endoftext|&gt;", "<|endoftext|>'s", "\u3000<|endoftext|>\u3000",
    "!<|endoftext|>!", "1<|endoftext|>2", "<|endoftext|>" * 3, "cat <|startoftext|> dog <|endoftext|> fox",
    "<|end\u200boftext|>", "<|endoftext|>\u0301", "<|ｅｎｄｏｆｔｅｘｔ|>",
]

EMPTY_AND_TINY = ["", " ", "\n", "\t\t", "\u3000", "\u200b", "a", "A", ".", "'"]

# Each "cat" is one token, so these fill 73..78 of the 75 places between start and end, with a word of
# several tokens, a special token or punctuation sitting on the cut.
STRADDLING_THE_CUT = [
    *(" ".join(["cat"] * n) for n in range(73, 79)),
    " ".join(["cat"] * 74) + " photorealistic",
    " ".join(["cat"] * 73) + " supercalifragilisticexpialidocious",
    " ".join(["cat"] * 74) + " <|endoftext|> dog",
    " ".join(["cat"] * 75) + "<|endoftext|>",
    " ".join(["cat"] * 74) + " 🧑🏽\u200d🚀",
    " ".join(["cat"] * 74) + "!!!",
    " ".join(["cat"] * 72) + " 12345",
]

LONG = [
    "a " * 200,
    "a" * 1000,
    "🐱" * 200,
    "日本" * 300,
    ", ".join(["masterpiece", "best quality", "ultra detailed", "8k"] * 30),
    " ".join(SD_PROMPTS),
    "<|endoftext|>" * 80,
]

# Every printable ASCII character alone and between letters, and every C0/C1 control character and a few
# format characters between letters: where the classes of the pre-tokenizer regex and whitespace meet.
ASCII = [chr(c) for c in range(0x21, 0x7F)] + [f"x{chr(c)}{chr(c)}y" for c in range(0x21, 0x7F)]
CONTROLS = [f"a{chr(c)}b" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]]

CORPUS_BY_KIND = {
    "sd_prompt": SD_PROMPTS,
    "apostrophe": CONTRACTIONS_AND_APOSTROPHES,
    "punctuation": PUNCTUATION,
    "number": NUMBERS,
    "unicode": UNICODE_TEXT,
    "emoji": EMOJI,
    "html": HTML_ENTITIES,
    "mojibake": MOJIBAKE,
    "control": CONTROL_CHARACTERS,
    "zero_width": ZERO_WIDTH,
    "whitespace": ODD_WHITESPACE,
    "fullwidth_quotes": FULLWIDTH_AND_QUOTES,
    "special_token": SPECIAL_TOKENS,
    "empty_tiny": EMPTY_AND_TINY,
    "cut": STRADDLING_THE_CUT,
    "long": LONG,
    "ascii": ASCII,
    "c0_c1": CONTROLS,
}

CORPUS = [text for texts in CORPUS_BY_KIND.values() for text in texts]
