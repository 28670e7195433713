"use strict";
// Filter and sort the pair cards in place. Cards carry their facts in data-* attributes set by
// the (escaping) template; this script only reads them and never builds HTML from strings.
(function () {
  var list = document.getElementById("pairs");
  var cards = Array.prototype.slice.call(list.querySelectorAll("article.pair"));
  var form = document.getElementById("controls");
  var show = document.getElementById("show");
  var sort = document.getElementById("sort");
  var min = document.getElementById("min");
  var max = document.getElementById("max");
  var find = document.getElementById("find");
  var count = document.getElementById("count");
  var groups = { ok: ["similar", "different"], failed: ["error", "timeout", "unreadable"] };

  function similarity(card) { return parseFloat(card.dataset.similarity); }
  function name(card) { return card.dataset.name; }
  function byName(a, b) { return name(a) < name(b) ? -1 : name(a) > name(b) ? 1 : 0; }
  var orders = {
    "different-first": function (a, b) { return similarity(a) - similarity(b) || byName(a, b); },
    "similar-first": function (a, b) { return similarity(b) - similarity(a) || byName(a, b); },
    "name": byName,
    "newest": function (a, b) {
      var x = a.dataset.created, y = b.dataset.created;
      return x < y ? 1 : x > y ? -1 : byName(a, b);
    }
  };

  function bound(input, fallback) {
    var value = parseFloat(input.value);
    return isNaN(value) ? fallback : value;
  }

  function visible(card, lo, hi, text) {
    var kind = card.dataset.kind, wanted = show.value;
    if (wanted !== "all") {
      var allowed = groups[wanted] || [wanted];
      if (allowed.indexOf(kind) < 0) return false;
    }
    // Pairs without a similarity (failures) only show while the range is the full 0..1.
    if (lo > 0 || hi < 1) {
      var s = similarity(card);
      if (s < 0 || s < lo || s > hi) return false;
    }
    return !text || name(card).toLowerCase().indexOf(text) >= 0;
  }

  function filter() {
    var lo = bound(min, 0), hi = bound(max, 1), text = find.value.trim().toLowerCase();
    var shown = 0;
    cards.forEach(function (card) {
      var keep = visible(card, lo, hi, text);
      card.hidden = !keep;
      if (keep) shown += 1;
    });
    count.textContent = shown + " of " + cards.length + " shown";
  }

  function reorder() {
    var fragment = document.createDocumentFragment();
    cards.slice().sort(orders[sort.value]).forEach(function (card) { fragment.appendChild(card); });
    list.appendChild(fragment);
  }

  // Some browsers (and WebDriver's option clicks) fire only "change" for a select.
  [show, min, max, find].forEach(function (el) {
    el.addEventListener("input", filter);
    el.addEventListener("change", filter);
  });
  sort.addEventListener("change", reorder);
  form.addEventListener("submit", function (event) { event.preventDefault(); });
  form.hidden = false;
  filter();
})();
