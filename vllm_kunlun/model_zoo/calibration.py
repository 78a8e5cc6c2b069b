"""Calibration text for GPTQ's Hessians (vllm_kunlun.model_zoo.gptq).

CALIBRATION_TEXT is original prose written for this project (a few kilobytes of varied plain
English and a little Python), kept here as a constant so that it ships with the package. It
is tokenized by the model's own tokenizer and cut into chunks of at most CHUNK_TOKENS tokens.

It is short (about 1,800 tokens), which is why GPTQ is opt-in and the 4-bit schemes round to
nearest by default: a Hessian of a layer with K inputs needs many more than K tokens to be
well estimated, and on the default model (layers with 1,536 inputs) GPTQ with this text
raised perplexity above round to nearest (w4a16-asym: +30% over the float model against
RTN's +15.4%; gptq: +50%). Without GPTQ it still gives gptq-act-order its channel order
(the Hessian diagonal).
"""

#: Tokens per calibration chunk (at most).
CHUNK_TOKENS = 256

CALIBRATION_TEXT = """\
The village of Harrowmere sits where two slow rivers meet, and for most of the year the
morning fog lies so thick over the water that the ferryman rings a bell every few minutes
to warn the fishing boats. Nobody remembers who built the stone bridge upstream, but
everyone agrees that it leans a little further to the east each winter. The baker opens
her shop at five, long before the church clock strikes, and by six there is already a line
of farmers waiting for the first loaves of rye bread.

On Tuesdays the market fills the square. Stalls sell apples, wool, honey, copper pots, and
seedlings wrapped in damp newspaper. Children run between the tables while their parents
argue, politely but at length, about the price of eggs. An old man with a violin plays the
same three tunes every week, and people pretend to be tired of them, yet they always drop a
coin into his hat before they go home.

Weather forecasting has changed a great deal over the last century. Early forecasters drew
maps by hand from telegraph reports, marking pressure, wind direction and temperature at
each station. Today numerical models divide the atmosphere into millions of small cells and
step the equations of fluid motion forward in time. Even so, the forecast for a week ahead
remains uncertain, because small errors in the starting conditions grow quickly. For that
reason, modern centres run an ensemble: dozens of slightly different simulations whose
spread tells the forecaster how confident to be.

A healthy breakfast does not need to be complicated. A bowl of oats cooked in milk, a
handful of berries, a spoonful of yoghurt and a few chopped walnuts will keep most people
going until lunch. If you are in a hurry, toast with peanut butter and a banana is almost as
good. What matters more than any single food is a regular routine: eating at roughly the
same time, drinking enough water, and not skipping the meal entirely.

Dear Ms. Patel,

Thank you for your letter of 14 March regarding the delayed shipment of office chairs. I am
sorry for the inconvenience. Our warehouse in Leeds was closed for two days because of a
burst pipe, and several orders were held back while the floor dried. Your chairs left the
depot yesterday and should arrive on Friday morning. As an apology, we have refunded the
delivery charge of twelve pounds to your account.

Yours sincerely,
Daniel Okafor, Customer Service

The history of the bicycle is a history of small improvements. The first machines of the
early nineteenth century had no pedals at all: riders pushed themselves along with their
feet. Later designs put pedals on a huge front wheel, which made them fast but dangerous.
The so-called safety bicycle, with two wheels of equal size and a chain driving the rear
one, appeared in the 1880s, and the air-filled tyre followed soon afterwards. Within a few
years cycling clubs had spread across Europe and North America, and the bicycle gave
millions of working people a cheap way to travel beyond their own neighbourhood.

Question: Why does ice float on water?
Answer: When water freezes, its molecules arrange themselves into an open hexagonal
lattice held together by hydrogen bonds. This structure takes up more space than liquid
water, so ice is about nine percent less dense and floats. Lakes therefore freeze from the
top down, and the layer of ice insulates the water beneath it, which helps fish survive the
winter.

To plant a tomato seedling, choose a sunny spot and dig a hole deeper than the pot. Remove
the lower leaves and bury the stem up to the first remaining set; roots will grow along the
buried part. Water well, add a stake or cage, and mulch the soil to keep it moist. Pinch
out the side shoots that appear between the main stem and the branches if you want fewer
but larger fruit.

The committee met on Wednesday to review the budget for the coming year. Revenue rose by
four percent, mostly thanks to higher membership fees, while costs grew by six percent
because of rising energy prices. The treasurer proposed postponing the roof repairs until
spring; after some discussion, the members voted seven to three in favour. The next meeting
will take place on the first Monday of May in the library annex.

She had never seen the sea before. When the train came out of the last tunnel, the whole
window filled with grey water and white foam, and she pressed her forehead against the
glass until her brother laughed at her. The air smelled of salt and diesel. Gulls circled
above the harbour, shouting at each other, and somewhere a radio was playing a song she
almost recognised.

In mathematics, a prime number is a whole number greater than one whose only divisors are
one and itself. The first few primes are 2, 3, 5, 7, 11, 13, 17, 19 and 23. Euclid proved
more than two thousand years ago that there are infinitely many of them: if you multiply
any finite list of primes together and add one, the result is divisible by none of them,
so some prime must be missing from the list.

def moving_average(values, window):
    \"\"\"Return the averages of each run of `window` consecutive values.\"\"\"
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages


class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count=1):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count=1):
        if self.items.get(name, 0) < count:
            raise KeyError(f"not enough {name} in stock")
        self.items[name] -= count

Most software bugs are not caused by clever algorithms going wrong but by ordinary
assumptions that turn out to be false: a file that is expected to exist, a list that is
assumed to be sorted, a date that falls in a leap year. Good tests make those assumptions
explicit. A useful habit is to write down, before fixing a bug, a small test that fails
because of it; once the fix is in place, the test passes and keeps the bug from returning.

The museum's new exhibition brings together paintings, maps and scientific instruments
from the age of exploration. Visitors can examine a brass astrolabe, a ship's log written
in faded brown ink, and a globe on which Australia is only half drawn. One room recreates a
captain's cabin, complete with a swaying lantern and the creak of timber, while another
explains how sailors measured longitude before accurate clocks were available.

Running a small café teaches you a lot about people. Regulars want their usual order
without having to ask for it. Tourists want directions, a clean bathroom and somewhere to
charge their phones. Students want the cheapest coffee and the table nearest the socket,
and they will stay for four hours. On rainy afternoons the place fills with strangers who
end up sharing tables, and now and then two of them leave together, still talking.

Photosynthesis happens in two stages. In the light-dependent reactions, chlorophyll absorbs
sunlight and uses its energy to split water, releasing oxygen and producing the energy
carriers ATP and NADPH. In the second stage, the Calvin cycle, the plant uses those
carriers to fix carbon dioxide from the air into sugars. Nearly all the oxygen we breathe
and most of the food we eat ultimately depend on this process.

The instructions were simple: turn left at the second traffic light, follow the road past
the petrol station, and take the narrow lane beside the red barn. After about a mile the
tarmac ends and the track becomes gravel. Park by the gate, walk across the field, and you
will see the cottage behind a row of tall poplars. The key is under the flowerpot.
"""


def calibration_chunks(tokenizer, chunk_tokens: int = CHUNK_TOKENS) -> list[list[int]]:
    """CALIBRATION_TEXT in the tokenizer's ids, cut into chunks of at most `chunk_tokens`."""
    ids = tokenizer(CALIBRATION_TEXT).input_ids
    return [ids[start : start + chunk_tokens] for start in range(0, len(ids), chunk_tokens)]
