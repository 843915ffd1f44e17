"""Prompts in the style people write for AUTOMATIC1111's web UI, and hand-checked expectations.

CORPUS_BY_KIND: prompts grouped by what they exercise; tests/test_prompts.py checks sdcore.prompts on each
against a reference restatement of A1111's algorithm. PARSE_CASES, NETWORK_CASES and REFUSED are literal
expectations, each worked out by hand from A1111's source (prompt_parser.parse_prompt_attention, whose
doctests are the first cases, and extra_networks.parse_prompt / extra_networks_lora.activate).
"""

import random

S = 1 / 1.1  # A1111 multiplies by this for each [ ]: 0.9090909090909091
BREAK = ("BREAK", -1.0)

# Textual-inversion embeddings the corpus names: name -> vectors (the sizes of the well-known files).
EMBEDDINGS = {
    "EasyNegative": 8,
    "bad-hands-5": 2,
    "bad_prompt_version2": 8,
    "ng_deepnegative_v1_75t": 75,
    "verybadimagenegative_v1.3": 1,
    "charturnerv2": 6,
    "style-empire": 10,
    "negative_hand-neg": 2,
    "bad": 1,  # a one-word name that is also the first token of two longer ones above
}

PLAIN = [
    "a photo of an astronaut riding a horse on mars",
    "portrait of a woman, oil painting, by greg rutkowski, trending on artstation",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile",
    "a cozy cabin in a snowy forest at night, warm light from the windows, 35mm photograph",
    "cyberpunk city street, neon signs, rain, reflections, cinematic lighting, 8k",
    "a bowl of ramen on a wooden table, steam, food photography, shallow depth of field",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped",
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry",
    "an isometric diorama of a tiny island with a lighthouse, low poly, blender render",
    "RAW photo, close up portrait of an old fisherman, wrinkles, dslr, soft lighting, film grain",
    "a watercolor painting of a fox in autumn leaves",
    "ukiyo-e print of mount fuji with a great wave",
    "a cute corgi wearing sunglasses on a beach",
    "studio ghibli style, a girl standing on a hill with wind in her hair",
    "concept art of a spaceship hangar, matte painting, artstation, unreal engine",
    "macro photograph of a dew drop on a spider web at sunrise",
    "a medieval knight in ornate armor, dramatic lighting, highly detailed",
    "pixel art of a dungeon entrance, 16-bit, retro game",
    "a minimalist logo of a mountain and a sun, flat vector",
    "the interior of a gothic cathedral, volumetric light rays, dust particles",
    "",
    " ",
    "cat",
    "a",
    ",,,,,",
    "a sign that says \"OPEN 24/7\"",
    "hyperrealistic, 4k uhd, f/1.8, 85mm, bokeh",
    "a:b:c, time 12:30, ratio 16:9",
    "<not a tag> and 3 < 4 > 2",
    "email me at someone@example.com or see https://example.com/a?b=c",
]

WEIGHTS = [
    "(masterpiece:1.2), best quality, (ultra detailed:1.4), 1girl, solo",
    "((masterpiece)), (((best quality))), [[lowres]]",
    "a (red:1.5) sports car, [blue] sky",
    "(worst quality, low quality:1.4), (monochrome:1.1), watermark, signature",
    "(a cat:0.5) and (a dog:1.5)",
    "(beautiful detailed eyes:1.3), (detailed face:1.2), (sharp focus:1.1)",
    "(photorealistic:1.4), (realistic:1.2), (8k, RAW photo, best quality, masterpiece:1.2)",
    "[[[blurry]]], [[bad hands]], [ugly]",
    "(cat:0), (dog:-1), (bird:+2), (fish:.5), (owl:5.)",
    "((sunset:1.2) over the ocean:1.1)",
    "(((((very important)))))",
    "[[[[[not important at all]]]]]",
    "a ((big)) [small] (medium:1) house",
    "(red)(green)(blue)",
    "(red:1.1)(green:1.1)",
    "a (b:1.2) c (d:1.2) e",
    "(solo:1.2), (1girl:1.3), (long hair:0.9), (blue eyes:1.25)",
    "(hdr:1.05), (intricate details:1.12), (hyperdetailed:1.15)",
    "(a:1.000), (b:1.0000001), (c:0.99999)",
    "(dramatic lighting:1.3) [lens flare:0.8]",
    "(score_9, score_8_up, score_7_up:1.2), source_anime",
    "((best quality, masterpiece:1.2), (detailed:1.1)), 8k",
    "[(highly detailed:1.3)]",
    "((close-up)) portrait, (looking at viewer:1.2)",
    "(extremely detailed CG unity 8k wallpaper), (masterpiece), (best quality), (ultra-detailed)",
    "(cinematic:1.3), (film grain:0.6), (vignette:0.7)",
    "a (((large))) dog next to a [[[tiny]]] cat",
    "(golden hour:1.2) (backlighting:1.1) (rim light:1.05)",
    "(deformed, distorted, disfigured:1.3), poorly drawn, bad anatomy, wrong anatomy",
    "(nsfw:1.5), (text, watermark:1.2)",
    "(wide shot:1.2), (full body:1.1), standing, (city background:0.9)",
    "(1.5:1.5) (2:2)",
    "(a: 1.2) (b :1.2) (c : 1.2)",
    "( spaced out:1.3 )",
    "(:1.2)(:0.5)()",
    "(masterpiece:1.2) (masterpiece:1.2) (masterpiece:1.2)",
    "very (very (very (very important:1.1):1.1):1.1)",
    "[slightly less], [[less]], [[[even less]]]",
    "(neon:1.3), [rain], ((reflections)), [[[fog]]], (((glow:1.2)))",
    "(Asian:0.8), (european:1.1)",
]

ESCAPES = [
    "hatsune miku \\(vocaloid\\), twintails",
    "artoria pendragon \\(fate\\), saber \\(fate\\)",
    "\\(literal parentheses\\) and \\[literal brackets\\]",
    "a backslash \\\\ in the middle",
    "C:\\path\\to\\file.png",
    "(kirby \\(series\\):1.2)",
    "\\((not weighted)\\)",
    "smile \\:\\) happy",
    "trailing backslash \\",
    "\\\\(weighted after a literal backslash\\\\)",
    "emoticon ^\\_^ and \\o/",
    "\\[\\[cat\\]\\]",
    "(\\(nested literal\\):1.3)",
    "a\\nb is not a newline",
    "¯\\\\_(ツ)_/¯",
]

NESTING = [
    "((a) (b) ((c)))",
    "[(a)]",
    "([a])",
    "(a [b] c)",
    "[a (b) c]",
    "(((a:1.2):1.2):1.2)",
    "((a:1.5))",
    "[(a:1.5)]",
    "(a (b (c (d (e)))))",
    "[a [b [c [d]]]]",
    "(a:1.2) [(b:1.3)] ((c:0.7))",
    "((((((((((deep))))))))))",
    "([([([x])])])",
    "(portrait of (a (smiling:1.2) woman:1.1) in (a (red:1.3) dress))",
    "((masterpiece, (best quality:1.2)):1.1)",
]

BREAKS = [
    "a cat BREAK a dog",
    "masterpiece, best quality BREAK 1girl, red hair BREAK forest background",
    "BREAK starts with a break",
    "ends with a break BREAK",
    "BREAK",
    "a BREAK BREAK b",
    "aBREAK b, a BREAKb, a break b, a Break b",
    "a,BREAK,b",
    "(weighted BREAK inside brackets)",
    "(weighted:1.2) BREAK [less]",
    "a\nBREAK\nb",
    "a\tBREAK\tb",
    "BREAK BREAK BREAK",
    "red dress BREAK (blue hair:1.2) BREAK green eyes BREAK yellow background",
    "x:BREAK:y",
    "(BREAK:0)",
    "((BREAK:-1):-1)",
    "(BR:-1)(EAK:-1) merged into a marker",
]

NETWORKS = [
    "<lora:add_detail:0.8> a castle on a hill",
    "1girl, <lora:animeoutline:0.6>, <lora:epiNoiseoffset_v2:1>, solo",
    "a portrait <lora:film_grain:0.5:0.8>",
    "<lyco:lokr_style:0.7> watercolor landscape",
    "<hypernet:anime_3:0.4> a girl",
    "<lora:detail:te=0.3:unet=0.9> sharp",
    "<lora:noweight> plain",
    "(<lora:inside_weight:1>:1.2) odd",
    "<lora:a:1><lora:b:0.5>touching tags",
    "<lora:my lora v2:0.8>, spaces in the name",
    "<lora:dyn_dims:0.8:0.8:16> with a dyn",
    "<LORA:upper_case_kind:0.5> kind as written",
    "<lora: spaced :1> name keeps its spaces",
    "<not a tag>, <also:not a tag, <lora:unclosed:1",
    "<3:hearts> are cut like A1111 cuts any <word:...>",
    "masterpiece <lora:x:0.6> BREAK <lora:y:0.4> landscape",
    "<lora:name:-0.5> negative weight",
    "<lora:name:1e-1> exponent weight",
    "<lora:name: 0.75 > spaced weight",
    "(masterpiece:1.2), <lora:LowRA:0.6>, <lora:more_details:0.3>, dark, night, moonlight",
]

EMBEDDING_PROMPTS = [
    "EasyNegative, bad-hands-5, lowres",
    "easynegative, worst quality",
    "(EasyNegative:1.2), (bad_prompt_version2:0.8)",
    "ng_deepnegative_v1_75t",
    "1girl, ng_deepnegative_v1_75t, smile",
    "verybadimagenegative_v1.3, text",
    "charturnerv2, a character turnaround of a knight",
    "style-empire, a palace",
    "negative_hand-neg, (bad-hands-5:1.5)",
    "bad hands, bad-hands, bad-hands-5, bad_prompt_version2, bad",
    "badhands, bad_, EasyNegatives, easy negative",
    "[EasyNegative]",
    "EasyNegative BREAK bad-hands-5",
    "\\(EasyNegative\\)",
    "ng_deepnegative_v1_75t ng_deepnegative_v1_75t",
    ", ".join(["cat"] * 34) + ", EasyNegative, dog",
    " ".join(["cat"] * 70) + " EasyNegative dog",
    " ".join(["cat"] * 73) + " bad-hands-5 dog",
    "(((EasyNegative))), [[bad-hands-5]]",
    "charturnerv2 style-empire EasyNegative bad-hands-5 negative_hand-neg",
]

MALFORMED = [
    "((unclosed",
    "[[unclosed",
    "closed too often))",
    "closed too often]]",
    "(mixed]",
    "[mixed)",
    "(a][b)",
    "((a)",
    "[[a]",
    "(a:1.5",
    "a:1.5)",
    "[a:1.5)",
    "(a:b)",
    "(a:)",
    "(:)",
    ")(",
    "][",
    "())(()",
    "(((a:1.2)",
    "[a|b] alternation is text here",
    "[cat:dog:0.5] editing is text here",
    "a AND b composition is text here",
    "# not a comment here",
    "(a:1.2]",
    "((a:1.2):)",
    "(a:1.2):1.3)",
    ":::(((:::)))",
    "( ( ( ) ) )",
]

UNICODE = [
    "富士山と桜, (満開:1.2), 夕焼け",
    "日本庭園の(錦鯉:1.3)",
    "a café in paris, crème brûlée, (naïve art:1.1)",
    "Ελληνικός ναός, (ηλιοβασίλεμα:1.2)",
    "москва зимой, (снег:1.3), [туман]",
    "🌸 cherry blossoms 🌸, (🐱:1.5), 🔥🔥🔥",
    "（full width parens） ［and brackets］",
    "a cat BREAK 一只狗",
    "\u200bzero\u200bwidth\u200b, (word\u00a0joined:1.2)",
    "Σίσυφος ΣΟΦΟΣ",
    "العربية (خط:1.2)",
    "हिन्दी (चित्र:1.1)",
    "한국어 [배경]",
    "emoji ZWJ 👩‍🚀 (astronaut:1.2)",
    "café\u0301 combining, ﬁ ligature",
    "\\(ツ\\) (ツ)",
]

# Token counts around the 75-token chunk and the 20-token comma backtrack.
_WORDS = ("cat", "dog", "tree", "house", "river", "cloud", "stone", "bird", "light", "shadow")
LONG = [
    " ".join(["cat"] * 75),
    " ".join(["cat"] * 76),
    " ".join(["cat"] * 150),
    " ".join(["cat"] * 151),
    " ".join(["cat"] * 74) + ", dog",
    " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 20),
    " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30),
    " ".join(["cat"] * 55) + ", " + " ".join(["dog"] * 25),
    " ".join(["cat"] * 54) + ", " + " ".join(["dog"] * 25),
    " ".join(["cat"] * 74) + ", " + " ".join(["dog"] * 5),
    " ".join(["cat"] * 75) + ", " + " ".join(["dog"] * 5),
    ", ".join(["cat"] * 80),
    ", ".join(["big cat"] * 60),
    ",".join(["cat"] * 100),
    " ".join(["cat"] * 75) + " BREAK dog",
    " ".join(["cat"] * 74) + " BREAK dog",
    " ".join(["cat"] * 60) + ", (" + " ".join(["dog"] * 20) + ":1.3)",
    "(" + ", ".join(["masterpiece"] * 40) + ":1.1), " + ", ".join(["best quality"] * 30),
    ", ".join(f"{_WORDS[i % 10]} {_WORDS[(i * 3) % 10]}" for i in range(90)),
    "masterpiece, best quality, ultra-detailed, illustration, 1girl, solo, long hair, looking at viewer, "
    "smile, blue eyes, blonde hair, dress, white dress, flower, hair ornament, outdoors, sky, day, cloud, "
    "blue sky, petals, cherry blossoms, tree, wind, floating hair, sunlight, light particles, "
    "depth of field, bokeh, from side, upper body, hand up, (detailed face:1.2), "
    "(beautiful detailed eyes:1.3), (intricate details:1.1), BREAK (spring:1.2), pastel colors, "
    "soft lighting, dreamy atmosphere, "
    "<lora:add_detail:0.5>, EasyNegative",
    " ".join(f"word{i}" for i in range(300)),
    ", ".join(["EasyNegative"] * 12),
    "ng_deepnegative_v1_75t, " * 3 + "end",
    ", ".join(["(cat:1.2)"] * 40) + ", " + ", ".join(["[dog]"] * 40),
]


def _generated(count: int, seed: int) -> list[str]:
    """Prompts put together from the pieces people combine, in a fixed pseudo-random order."""
    rng = random.Random(seed)
    subjects = ["1girl", "a knight", "an old robot", "a red fox", "a lighthouse", "a dragon", "two cats",
                "a cyberpunk samurai", "a castle", "an astronaut"]
    styles = ["oil painting", "anime style", "photorealistic", "watercolor", "digital art", "concept art",
              "by greg rutkowski", "studio ghibli", "trending on artstation", "octane render"]
    quality = ["masterpiece", "best quality", "ultra detailed", "8k", "highres", "sharp focus", "hdr"]
    extras = ["EasyNegative", "bad-hands-5", "<lora:add_detail:0.7>", "<lyco:style:0.5>", "BREAK",
              "\\(series\\)", "ng_deepnegative_v1_75t", "(", ")", "[", "]", ":1.3)", "日本", "🌙"]

    def term() -> str:
        word = rng.choice(subjects + styles + quality)
        form = rng.randrange(7)
        if form == 0:
            return f"({word}:{rng.choice(['0.5', '0.8', '1.1', '1.2', '1.25', '1.4', '1.5'])})"
        if form == 1:
            return "(" * rng.randint(1, 3) + word + ")" * rng.randint(1, 3)
        if form == 2:
            return "[" * rng.randint(1, 2) + word + "]" * rng.randint(0, 2)
        if form == 3:
            return rng.choice(extras)
        return word

    prompts = []
    for _ in range(count):
        separator = rng.choice([", ", ",", " ", ", ", " BREAK "])
        prompts.append(separator.join(term() for _ in range(rng.randint(1, 45))))
    return prompts


GENERATED = _generated(60, seed=1111)

CORPUS_BY_KIND = {
    "plain": PLAIN, "weights": WEIGHTS, "escapes": ESCAPES, "nesting": NESTING, "break": BREAKS,
    "networks": NETWORKS, "embeddings": EMBEDDING_PROMPTS, "malformed": MALFORMED, "unicode": UNICODE,
    "long": LONG, "generated": GENERATED,
}
CORPUS = [prompt for prompts in CORPUS_BY_KIND.values() for prompt in prompts]

# (prompt, parse_emphasis output): A1111's doctests first, then the rules they do not show.
PARSE_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("((a))", [("a", 1.2100000000000002)]),
    ("[a]", [("a", 0.9090909090909091)]),
    ("[[a]]", [("a", 0.8264462809917354)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:5.)", [("a", 5.0)]),
    ("((a:1.5))", [("a", 1.6500000000000001)]),
    ("[(a:1.5)]", [("a", 1.3636363636363635)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),  # 1 / 1.1 * 1.1 is exactly 1
    ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
    ("(a)(b:1.1)", [("ab", 1.1)]),  # 1.0 * 1.1 and float("1.1") are the same float: merged
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),  # a weight with no "(" open is text
    ("(a:1.5", [("a:1.5", 1.1)]),  # no ")" after the number: ":" and "1.5" are text, the "(" is unclosed
    ("[a:1.5)", [("a:1.5)", S)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("a:b", [("a:b", 1.0)]),
    ("((a)", [("a", 1.2100000000000002)]),
    ("[[a]", [("a", 0.8264462809917354)]),
    ("(a][b)", [("a]", 1.1), ("b", 1.0)]),  # "]" with no "[" open is text; the "[" stays open
    ("a (:1.5) b", [("a  b", 1.0)]),  # the weight covers nothing
    ("(a:1.2]", [("a:1.2]", 1.1)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before anything but ()[]\ vanishes
    ("\\", [("", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("(\\(a\\))", [("(a)", 1.1)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), BREAK, (",b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    # Inside brackets the marker's -1 is multiplied too: A1111 then tokenizes "BREAK" as a word.
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("(BR:-1)(EAK:-1)", [("BREAK", -1.0)]),  # merged runs that spell A1111's marker are one
    ("(red:1.1)(green:1.1)", [("redgreen", 1.1)]),
    ("very (very (very important:1.1):1.1)",
     [("very ", 1.0), ("very ", 1.1), ("very important", 1.2100000000000002)]),
]

# (prompt, text left, [(kind, name, weight, unet_weight)])
NETWORK_CASES = [
    ("a <lora:film:0.6> b", "a  b", [("lora", "film", 0.6, 0.6)]),
    ("<lora:x>", "", [("lora", "x", 1.0, 1.0)]),
    ("<lora:x:0.5:0.8>", "", [("lora", "x", 0.5, 0.8)]),
    ("<lora:x:te=0.3>", "", [("lora", "x", 0.3, 0.3)]),
    ("<lora:x:0.5:unet=0.1>", "", [("lora", "x", 0.5, 0.1)]),
    ("<lyco:y:0.7> z", " z", [("lyco", "y", 0.7, 0.7)]),
    ("<hypernet:h:0.4>", "", [("hypernet", "h", 0.4, 0.4)]),
    ("<lora: x :1>", "", [("lora", " x ", 1.0, 1.0)]),
    ("<lora:a:1><lora:b:0.5>", "", [("lora", "a", 1.0, 1.0), ("lora", "b", 0.5, 0.5)]),
    ("<lora:x:1.5:0.5:16>", "", [("lora", "x", 1.5, 0.5)]),
    ("<notatag> <lora:unclosed:1", "<notatag> <lora:unclosed:1", []),
    ("(<lora:x:1>:1.2)", "(:1.2)", [("lora", "x", 1.0, 1.0)]),
    ("<lora:x: 0.75 >", "", [("lora", "x", 0.75, 0.75)]),
]

# (prompt, message fragment, whether A1111 fails on it too): refused with an InvalidField naming the
# problem. A1111 takes a nan or inf LoRA weight and makes a NaN image.
REFUSED = [
    ("(a:1.2.3)", "has the emphasis weight '1.2.3' (in ':1.2.3)'), which is not a number", True),
    ("(a:.)", "has the emphasis weight '.'", True),
    ("(a:..5)", "has the emphasis weight '..5'", True),
    ("<lora:x:abc>", "the tag <lora:x:abc> has weight 'abc', which is not a finite number", True),
    ("<lora:te=0.5>", "the tag <lora:te=0.5> names no network", True),
    ("<lora:x:nan>", "has weight 'nan', which is not a finite number", False),
    ("<lora:x:1:inf>", "has U-Net weight 'inf'", False),
]
