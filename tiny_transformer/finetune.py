"""Fine-tuning data: a small text in a different style, and tools to fit any text to a tokenizer.

Fine-tuning continues training a model that already knows a language (here: Shakespeare's) on a
new, much smaller text, at a lower learning rate. The model keeps what it learnt about spelling and
words and picks up the new style quickly. To see that happen we need a text whose style is easy to
tell apart from a play: `DEMO_TEXT` is a short kitchen notebook in plain modern English — recipes,
with titles in capitals and numbered-by-word steps — written for this course.

A character-level model can only read the characters it was trained on. `check_vocabulary` lists
what a text contains that the tokenizer does not know, and `fit_to_vocabulary` rewrites the
common cases (curly quotes, dashes, digits) and drops the rest, so any UTF-8 file you bring can be
used for fine-tuning:

    >>> text, report = fit_to_vocabulary(open("my.txt", encoding="utf-8").read(), tokenizer)
    >>> print(report)          # what was replaced or removed

From the command line, `python -m tiny_transformer train --init-from CHECKPOINT --data FILE
--experiment-name NEW` fine-tunes a checkpoint; it uses `check_vocabulary` to refuse a text with
characters the checkpoint's tokenizer does not know.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

DEMO_TEXT = """\
THE KITCHEN NOTEBOOK

A few plain recipes for a small kitchen, written down so that nobody has to ask twice.

PLAIN BREAD.
You will need flour, warm water, salt and a spoon of dried yeast.
First, stir the yeast into the warm water and leave it for ten minutes, until it foams.
Then put the flour and the salt in a large bowl and pour in the water.
Mix with a wooden spoon until the dough comes together, then knead it on the table for ten minutes.
Cover the bowl with a clean cloth and leave it somewhere warm for an hour.
When the dough has doubled, press it flat, fold it, and shape it into a loaf.
Bake in a hot oven for half an hour, until the loaf sounds hollow when you tap it.
Let it cool before you cut it, or the inside will be gummy.

TOMATO SOUP.
You will need ripe tomatoes, one onion, two cloves of garlic, olive oil, salt and pepper.
First, chop the onion and the garlic and soften them in the oil over a low heat.
Then add the tomatoes, cut in halves, with a cup of water and a pinch of salt.
Simmer for twenty minutes, stirring now and then, until the tomatoes fall apart.
Blend the soup until it is smooth, taste it, and add pepper.
Serve it hot, with a slice of the plain bread and a little butter.

A GOOD OMELETTE.
You will need two eggs, a knob of butter, salt and a handful of grated cheese.
First, beat the eggs with a fork and a pinch of salt. Do not beat them for too long.
Then melt the butter in a small pan over a medium heat, until it stops foaming.
Pour in the eggs and stir them gently with the fork while the pan is still moving.
When the eggs are nearly set but still soft on top, scatter the cheese over one half.
Fold the omelette in two, slide it onto a warm plate, and eat it at once.

RICE WITH PEAS.
You will need one cup of rice, two cups of water, a cup of peas, butter and salt.
First, rinse the rice in a sieve until the water runs clear.
Then put the rice, the water and a pinch of salt in a pan, and bring it to the boil.
Turn the heat down, cover the pan, and cook for twelve minutes without lifting the lid.
Add the peas, cover again, and leave the pan off the heat for five minutes.
Stir in the butter with a fork, so that the grains stay loose.

APPLE CAKE.
You will need three apples, two eggs, a cup of sugar, a cup of flour, butter and a spoon of cinnamon.
First, heat the oven and butter a round tin.
Then peel the apples, take out the cores, and cut them in thin slices.
Beat the butter and the sugar together until the mixture is pale and soft.
Add the eggs one at a time, beating well after each one, then fold in the flour.
Spread the batter in the tin and lay the apple slices on top in a circle.
Sprinkle the cinnamon and a spoon of sugar over the apples.
Bake for forty minutes, until a knife pushed into the middle comes out clean.
Leave the cake in the tin for ten minutes, then turn it out to cool.

LENTIL STEW.
You will need a cup of red lentils, one onion, one carrot, a tin of tomatoes, cumin, salt and oil.
First, chop the onion and the carrot and cook them in the oil until they are soft.
Then add the cumin and stir for a minute, until it smells warm.
Add the lentils, the tomatoes and three cups of water, and bring it to the boil.
Simmer for half an hour, stirring from time to time, and add more water if it gets too thick.
Season with salt, and serve it with rice or with bread.

PANCAKES.
You will need a cup of flour, one egg, a cup of milk, a pinch of salt and butter for the pan.
First, put the flour and the salt in a bowl and make a well in the middle.
Then break the egg into the well and add the milk a little at a time, whisking as you go.
Leave the batter to rest for half an hour while you clean the kitchen.
Heat a pan, wipe it with butter, and pour in just enough batter to cover the bottom.
Cook until the edges curl, then turn the pancake and cook the other side for a minute.
Serve with lemon and sugar, or with the apple cake, if any is left.

A NOTE ON SALT.
Add salt a little at a time, and taste as you cook. You can always add more, but you cannot take it out.
A pinch is what you can hold between your finger and your thumb.
Bread without salt is flat and dull; soup without salt tastes of water.

A NOTE ON THE OVEN.
Every oven is different. Watch the first loaf and the first cake closely, and write down what worked.
If the top browns before the middle is done, lay a sheet of paper over it and lower the heat.
Open the door as little as you can: each time you open it, the heat runs out.

A NOTE ON WASHING UP.
Fill the sink while the soup simmers and wash the bowls as you go.
A clean table at the end of the evening is the best part of any recipe.
"""

# Common characters outside a Tiny Shakespeare vocabulary, and plain replacements for them.
REPLACEMENTS = {
    "\u2018": "'", "\u2019": "'", "\u201c": "'", "\u201d": "'", '"': "'", "\u2013": "-", "\u2014": "-",
    "\u2026": "...", "\t": " ", "\r": "", "(": ",", ")": ",", "0": "zero", "1": "one", "2": "two",
    "3": "three", "4": "four", "5": "five", "6": "six", "7": "seven", "8": "eight", "9": "nine",
}


def demo_text() -> str:
    """The bundled fine-tuning demo: a kitchen notebook of recipes (original text, about 5 KB)."""
    return DEMO_TEXT


def write_demo_text(path: str | Path) -> Path:
    """Write `DEMO_TEXT` to `path` (UTF-8), e.g. data/finetune_demo.txt; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(DEMO_TEXT)
    return path


def load_finetune_text(path: str | Path | None = None) -> str:
    """The text of `path` (your own file, UTF-8), or the bundled demo when `path` is None."""
    if path is None:
        return DEMO_TEXT
    from tiny_transformer.data import load_text

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"fine-tuning text {path} not found; give the path of a UTF-8 text file, "
                                "or None for the bundled demo text")
    return load_text(path)


def unknown_characters(text: str, tokenizer) -> Counter:
    """Characters of `text` that `tokenizer` (a CharTokenizer) cannot encode, with their counts."""
    vocab = getattr(tokenizer, "vocab", None)
    if not isinstance(vocab, dict):
        raise ValueError("unknown_characters needs a CharTokenizer (with a .vocab dict of characters)")
    return Counter(ch for ch in text if ch not in vocab)


def check_vocabulary(text: str, tokenizer, fix: str | None = None) -> None:
    """Raise ValueError listing every character of `text` the tokenizer does not know, and the fix.

    `fix` replaces the default advice (clean the text with `fit_to_vocabulary`), e.g. with the
    command-line version of it.
    """
    unknown = unknown_characters(text, tokenizer)
    if unknown:
        listed = ", ".join(f"{ch!r} x{n}" for ch, n in unknown.most_common(12))
        more = f" and {len(unknown) - 12} more" if len(unknown) > 12 else ""
        fix = fix or "clean it with tiny_transformer.finetune.fit_to_vocabulary(text, tokenizer)"
        raise ValueError(f"the text has {len(unknown)} character(s) the tokenizer does not know: {listed}{more}; "
                         f"{fix}")


def fit_to_vocabulary(text: str, tokenizer, replacements: dict[str, str] | None = None) -> tuple[str, str]:
    """Rewrite `text` so that `tokenizer` can encode all of it. Returns (clean text, report).

    Each unknown character is replaced by its entry in `replacements` (default `REPLACEMENTS`:
    curly quotes -> ', dashes -> -, digits -> words) when the replacement itself is encodable,
    then tried in the other letter case, and otherwise removed. The report counts what changed.
    """
    table = REPLACEMENTS if replacements is None else replacements
    unknown = unknown_characters(text, tokenizer)
    if not unknown:
        return text, "every character is in the vocabulary; nothing changed"
    vocab = tokenizer.vocab
    digits = sum(n for ch, n in unknown.items() if ch.isdigit() and ch in table)
    # Runs of digits become words one digit at a time, separated by spaces: "42" -> "four two".
    text = re.sub(r"[0-9]+", lambda m: " ".join(table.get(d, d) if d not in vocab else d for d in m.group()),
                  text)
    unknown = unknown_characters(text, tokenizer)
    mapping, lines = {}, [f"{digits} digit(s) -> words"] if digits else []
    for ch, n in unknown.most_common():
        options = [table.get(ch), ch.swapcase() if ch.swapcase() != ch else None]
        choice = next((o for o in options if o is not None and all(c in vocab for c in o)), "")
        mapping[ch] = choice
        lines.append(f"{ch!r} x{n} -> {repr(choice) if choice else 'removed'}")
    clean = "".join(mapping.get(ch, ch) for ch in text)
    return clean, "replaced or removed: " + "; ".join(lines)
