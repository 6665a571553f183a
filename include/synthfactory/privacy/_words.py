"""Common English words for the leak scan (:mod:`synthfactory.privacy.leak`): a one-word name that is
one of them is not, on its own, evidence of a leak. Vendored so the scan needs no network and no optional
package at run time; lower-cased, one word each.

Sources (copied from the installed packages, lower-cased, de-duplicated and sorted):

* ``FAKER_EN_US``: Faker 40.54.0, ``faker/providers/lorem/en_US/__init__.py`` ``Provider.word_list``
  (971 of the most common English words). MIT License, Copyright (c) 2012 Daniele Faraglia
  (https://github.com/joke2k/faker/blob/master/LICENSE.txt): "Permission is hereby granted, free of charge,
  to any person obtaining a copy of this software ... The above copyright notice and this permission notice
  shall be included in all copies or substantial portions of the Software."
* ``STOP_WORDS``: scikit-learn 1.9.1, ``sklearn/feature_extraction/_stop_words.py``
  ``ENGLISH_STOP_WORDS`` (318 words, from the Glasgow Information Retrieval Group's list).
  BSD-3-Clause, Copyright (c) the scikit-learn developers
  (https://github.com/scikit-learn/scikit-learn/blob/main/COPYING).
"""

from __future__ import annotations

__all__ = ["COMMON_WORDS"]

FAKER_EN_US = """
a ability able about above accept according account across act action activity actually add address
administration admit adult affect after again against age agency agent ago agree agreement ahead air
all allow almost alone along already also although always american among amount analysis and animal
another answer any anyone anything appear apply approach area argue arm around arrive art article
artist as ask assume at attack attention attorney audience author authority available avoid away
baby back bad bag ball bank bar base be beat beautiful because become bed before begin behavior
behind believe benefit best better between beyond big bill billion bit black blood blue board body
book born both box boy break bring brother budget build building business but buy by call camera
campaign can candidate capital car card care career carry case catch cause cell center central
century certain certainly chair challenge chance change character charge check child choice choose
church citizen city civil claim class clear clearly close coach cold collection college color
commercial common community company compare computer concern condition conference congress consider
consumer contain continue control cost could country couple course court cover create crime cultural
culture cup current customer cut dark data daughter day deal debate decade decide decision deep
defense degree democrat democratic describe design despite detail determine develop development
difference different difficult dinner direction director discover discuss discussion do doctor dog
door down draw dream drive drop drug during each early east easy eat economic economy edge education
effect effort eight either election else employee end energy enjoy enough enter entire environment
environmental especially establish even evening event ever every everybody everyone everything
evidence exactly example executive exist expect experience expert explain eye face fact factor fall
family far fast father fear federal feel feeling few field fight figure fill film final finally
financial find fine finish fire firm first fish five floor fly focus follow food foot for force
foreign forget form former forward four free friend from front full fund future game garden gas
general generation get girl give glass go goal good government great green ground group grow growth
guess gun guy hair half hand happen happy hard have he head health hear heart heavy help her here
herself high him himself his history hit hold home hope hospital hot hotel hour house how however
huge human hundred husband i idea identify if image imagine impact important improve in include
including increase indeed indicate individual industry information inside instead institution
interest interesting international interview into investment involve issue it item its itself job
join just keep key kid kind kitchen know knowledge land language large last late later laugh law
lawyer lay lead leader learn least leave left leg less let letter level life light like likely line
list listen little live local long look lose loss lot low machine magazine main maintain major
majority make man manage management manager many market marriage material matter may maybe me mean
measure media medical meet meeting member memory mention message method middle might military
million mind minute miss mission model modern moment money month more morning most mother mouth move
movement movie mr mrs much music must my myself name nation national natural nature near nearly
necessary need network never new news newspaper next nice night no none nor north not note nothing
notice now number occur of off offer office officer official often oil ok old on once one only onto
open operation opportunity option or order organization other others our out outside over own owner
page painting paper parent part participant particular particularly partner party pass past pattern
pay peace people per perform performance perhaps person personal phone physical pick picture piece
place plan plant play player pm point police policy political politics poor popular population
position positive possible power practice prepare present president pressure pretty prevent price
probably process produce product production professional professor program project property protect
prove provide public pull purpose push put quality question quickly quite race radio raise range
rate rather reach read ready real reality realize really reason receive recent recently recognize
record red reduce reflect region relate relationship religious remain remember report represent
republican require research resource respond response responsibility rest result return reveal rich
right rise risk road rock role room rule run safe same save say scene school science scientist score
sea season seat second section security see seek seem sell send senior sense series serious serve
service set seven several shake share she short should shoulder show side sign significant similar
simple simply since sing single sister sit site situation six size skill skin small smile so social
society soldier some somebody someone something sometimes son song soon sort sound source south
southern space speak special specific speech spend sport spring staff stage stand standard star
start state statement station stay step still stock stop store story strategy street strong
structure student study stuff style subject success successful such suddenly suffer suggest summer
support sure surface system table take talk task tax teach teacher team technology television tell
ten tend term test than thank that the their them themselves then theory there these they thing
think third this those though thought thousand threat three through throughout throw thus time to
today together tonight too top total tough toward town trade traditional training travel treat
treatment tree trial trip trouble true truth try turn tv two type under understand unit until up
upon us use usually value various very view visit voice vote wait walk wall want war watch water way
we wear week weight well west western what whatever when where whether which while white who whole
whom whose why wide wife will win wind window wish with within without woman wonder word work worker
world worry would write writer wrong yard yeah year yes yet you young your yourself
"""

STOP_WORDS = """
a about above across after afterwards again against all almost alone along already also although
always am among amongst amoungst amount an and another any anyhow anyone anything anyway anywhere
are around as at back be became because become becomes becoming been before beforehand behind being
below beside besides between beyond bill both bottom but by call can cannot cant co con could
couldnt cry de describe detail do done down due during each eg eight either eleven else elsewhere
empty enough etc even ever every everyone everything everywhere except few fifteen fifty fill find
fire first five for former formerly forty found four from front full further get give go had has
hasnt have he hence her here hereafter hereby herein hereupon hers herself him himself his how
however hundred i ie if in inc indeed interest into is it its itself keep last latter latterly least
less ltd made many may me meanwhile might mill mine more moreover most mostly move much must my
myself name namely neither never nevertheless next nine no nobody none noone nor not nothing now
nowhere of off often on once one only onto or other others otherwise our ours ourselves out over own
part per perhaps please put rather re same see seem seemed seeming seems serious several she should
show side since sincere six sixty so some somehow someone something sometime sometimes somewhere
still such system take ten than that the their them themselves then thence there thereafter thereby
therefore therein thereupon these they thick thin third this those though three through throughout
thru thus to together too top toward towards twelve twenty two un under until up upon us very via
was we well were what whatever when whence whenever where whereafter whereas whereby wherein
whereupon wherever whether which while whither who whoever whole whom whose why will with within
without would yet you your yours yourself yourselves
"""

#: every word of both lists
COMMON_WORDS: frozenset[str] = frozenset(FAKER_EN_US.split()) | frozenset(STOP_WORDS.split())
